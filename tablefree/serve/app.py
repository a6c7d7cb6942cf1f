"""The FastAPI application: OpenAI-compatible routes over one Engine; every client mistake is a 4xx JSON error."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import ServeLimits
from .chat_template import ChatTemplate, ChatTemplateError
from .engine import Engine, LoopSink, QueueFull, Sequence
from .engine_process import EngineDead
from .gate import RequestGate
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Prompt,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    brief,
)
from .responses import RequestRun

MAX_SEQUENCES_PER_REQUEST = 64
NOT_AN_OBJECT = "the request body must be a JSON object (send it with Content-Type: application/json)"

log = logging.getLogger("tablefree.serve")


@dataclass
class ServeSettings:
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = ServeLimits.max_body_bytes
    eos_ids: frozenset[int] = frozenset()
    end_of_turn_ids: frozenset[int] = frozenset()  # tokens that close a chat turn (e.g. [EOT]); chat stops there too
    # The sampling fields this sets are the server's defaults for requests that leave them out (see protocol).
    sampling_defaults: SamplingFields = field(default_factory=SamplingFields)
    chat_template: ChatTemplate | None = None  # the tokenizer's, compiled and tried at start (server.serve_command)


class TextWorker:
    """Tokenizer work on one thread of its own, so a multi-megabyte prompt never stalls the event loop (or /health).

    Fast tokenizers encode through their Rust backend's `encode_batch_fast`, which releases the GIL
    (a single `encode` holds it for the whole text); other tokenizers encode through transformers.
    A text over `limit` tokens comes back as its count alone: building a million-id list holds the GIL.
    """

    def __init__(self, tokenizer, chat_template: ChatTemplate | None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tablefree-tokenize")

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def encode(self, texts: list[str], add_special_tokens: bool = True, limit: int | None = None) -> list[Encoded]:
        return await self.run(self._encode, texts, add_special_tokens, limit)

    async def completion_prompts(self, prompt: Prompt, limit: int) -> list[Encoded]:
        """Completion rendering: each of a request's prompts (a text, texts, token ids or lists of them) as ids."""
        if isinstance(prompt, str):
            return await self.encode([prompt], limit=limit)
        if isinstance(prompt[0], str):
            return await self.encode(prompt, limit=limit)
        return [Encoded(ids, len(ids)) for ids in ([prompt] if isinstance(prompt[0], int) else prompt)]

    async def chat(self, messages: list[ChatMessage], add_generation_prompt: bool, limit: int | None = None) -> Encoded:
        """Chat rendering: the messages through the tokenizer's chat template, then as ids."""
        if self.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        return await self.run(self._chat, conversation(messages), add_generation_prompt, limit)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, texts: list[str], add_special_tokens: bool, limit: int | None) -> list[Encoded]:
        if self.backend is None:
            encoded = [self.tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]
            return [Encoded(ids if limit is None or len(ids) <= limit else None, len(ids)) for ids in encoded]
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [Encoded(e.ids if limit is None or len(e) <= limit else None, len(e)) for e in encodings]

    def _chat(self, conversation: list[dict], add_generation_prompt: bool, limit: int | None) -> Encoded:
        try:
            text = self.chat_template.render(conversation, add_generation_prompt)
        except ChatTemplateError as exc:  # the template's own raise_exception, or what it would build past the bound
            raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
        return self._encode([text], False, limit)[0]


class Encoded(NamedTuple):
    ids: list[int] | None  # None when the text is over the limit it was encoded with
    count: int


def create_app(engine: Engine, tokenizer, settings: ServeSettings) -> FastAPI:
    metrics = ServerMetrics(engine)
    text = TextWorker(tokenizer, settings.chat_template)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()  # uvicorn has already drained the in-flight requests by now
        text.close()

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
    app = FastAPI(title="tablefree serve", version="1", lifespan=lifespan, responses=errors)
    app.add_middleware(RequestGate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    def answer(error: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return answer(exc, {"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        return answer(APIError(400, *describe_invalid(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = {404: f"no endpoint {brief(request.url.path)}; see /docs for the API",
                   405: f"{request.method} is not allowed on {brief(request.url.path)}"}.get(exc.status_code, str(exc.detail))
        return answer(APIError(exc.status_code, message), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        # A bug, not the client's doing: still a JSON error (uvicorn logs the traceback once).
        return answer(APIError(500, f"internal error ({type(exc).__name__}); the server log has the details", None,
                               "server_error"))

    server = _Routes(engine, text, settings, metrics)
    app.get("/health")(server.health)
    app.get("/metrics", response_class=Response)(server.metrics_text)
    app.get("/v1/models")(server.models)
    # A stream is a StreamingResponse, which FastAPI passes through; the model documents the body.
    app.post("/v1/completions", response_model=Completion)(server.completions)
    app.post("/v1/chat/completions", response_model=ChatCompletion)(server.chat_completions)
    app.post("/tokenize", response_class=Response, responses={200: {"model": TokenizeResponse}})(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    return app


def describe_invalid(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for the first validation error, with param the path into the body as the client wrote it."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    loc = tuple(first.get("loc", ()))
    loc = loc[1:] if loc[:1] == ("body",) else loc
    kind = first.get("type")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail} at character {loc[0] if loc else 0})", None
    if not loc:
        if kind == "missing":
            return "the request body is missing: " + NOT_AN_OBJECT, None
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            return NOT_AN_OBJECT, None
    param = body_path(loc, getattr(exc, "body", None), kind == "missing")
    return (f"{param}: {first['msg']}" if param else str(first["msg"])), param


def body_path(loc: tuple, body, missing: bool) -> str | None:
    """`messages[0].content` from pydantic's loc, leaving out the union tags it inserts (they are not in the body)."""
    path, node = "", body
    for i, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
            continue
        key = next((k for k in node if k == part or lossy(k) == part), None) if isinstance(node, dict) else None
        if key is not None or missing and i == len(loc) - 1:
            key = part if key is None else key
            path, node = f"{path}.{key}" if path else str(key), node.get(key) if isinstance(node, dict) else None
    return path or None


def lossy(key: str) -> str:
    """A key as pydantic reports it: its loc cannot hold lone surrogates and has U+FFFD per byte instead."""
    return key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class _Routes:
    def __init__(self, engine: Engine, text: TextWorker, settings: ServeSettings, metrics: ServerMetrics):
        self.engine, self.text, self.settings, self.metrics = engine, text, settings, metrics
        self.card = ModelCard(id=settings.model_name, created=int(time.time()), max_model_len=settings.max_model_len)

    async def health(self) -> Health:
        if self.engine.failure is not None:  # the engine process died: the server is shutting down
            raise APIError(503, f"{self.engine.failure}; the server is shutting down", None, "server_error")
        return Health()

    async def metrics_text(self):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> ModelList:
        return ModelList(data=[self.card])

    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        if body.messages is not None:
            ids = (await self.text.chat(body.messages, True)).ids
        elif body.prompt is not None:
            ids = (await self.text.encode([body.prompt], body.add_special_tokens))[0].ids
        else:
            raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
        head = {"count": len(ids), "max_model_len": self.settings.max_model_len}
        return Response(await self.text.run(json_in_pieces, head, "tokens", ids), media_type="application/json")

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        return DetokenizeResponse(prompt=await self.text.run(self._decoded, body.tokens))  # a million ids: off the loop

    def _decoded(self, ids: list[int]) -> str:
        self._check_ids(ids, "tokens")
        return self.text.tokenizer.decode(ids)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        if body.suffix:
            raise APIError(400, "'suffix' (fill-in-the-middle) is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (candidates are not ranked)", "best_of")
        prompt_count = 1 if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else len(body.prompt)
        self._check_sequence_count(prompt_count, body.n)
        plans = []
        for prompt in await self.text.completion_prompts(body.prompt, self.settings.max_model_len):
            params = body.sampling_params(prompt.count, **self._sampling_context())
            self._check_ids(prompt.ids, "prompt")
            plans.append((prompt.ids, params))
        return await self._serve(request, body, plans, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        if body.tools:
            raise APIError(400, "tool calling is not supported by this server", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported (no JSON or schema mode)", "response_format")
        self._check_sequence_count(1, body.n)
        rendered = await self.text.chat(body.messages, body.add_generation_prompt, self.settings.max_model_len)
        if not rendered.count:
            raise APIError(400, "the rendered conversation is empty", "messages")
        params = body.sampling_params(rendered.count, **self._sampling_context())
        self._check_ids(rendered.ids, "messages")
        return await self._serve(request, body, [(rendered.ids, params)], chat=True)

    # ---- validation ----
    def _sampling_context(self) -> dict:
        s = self.settings
        return {"vocab_size": s.vocab_size, "max_model_len": s.max_model_len, "defaults": s.sampling_defaults}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"the model {brief(name)} does not exist; this server serves {brief(self.settings.model_name)}",
                           "model", "model_not_found")

    def _check_sequence_count(self, prompts: int, n: int) -> None:
        if prompts * n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{prompts} prompts x n={n} is over {MAX_SEQUENCES_PER_REQUEST} sequences per request", "n")

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < self.settings.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.settings.vocab_size})", param)

    # ---- generation ----
    async def _serve(self, request: Request, body, plans, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        eos = set(self.settings.eos_ids) | (set(self.settings.end_of_turn_ids) if chat else set())
        sequences = []
        for p, (ids, params) in enumerate(plans):
            for i in range(body.n):
                index = p * body.n + i
                sequences.append(Sequence(ids, params, self.text.tokenizer, LoopSink(loop, events, index), eos, choice=i))
        try:
            self.engine.submit(sequences)
        except QueueFull as exc:
            raise APIError(503, f"server busy: {exc}; retry shortly", None, "server_busy") from None
        except EngineDead as exc:
            raise APIError(503, f"{exc}; the server is shutting down", None, "server_error") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "n") from None
        run = RequestRun(self.text.tokenizer, self.settings.model_name, self.metrics, body, plans, sequences, events, chat,
                         time.perf_counter())
        self.metrics.prompt_tokens.inc(run.prompt_tokens)
        if body.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        return await run.respond(request)  # built and encoded off the event loop


def conversation(messages) -> list[dict]:
    """The messages as the chat template reads them (text parts joined; a missing content is empty)."""
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])}
            for m in messages]


def json_in_pieces(head: dict, name: str, ids: list[int], piece: int = 65536) -> str:
    """`head` plus `name: ids` as JSON, encoded a slice at a time: one json.dumps of a million ids holds the GIL ~0.2 s."""
    parts = [json.dumps(ids[i : i + piece])[1:-1] for i in range(0, len(ids), piece)]
    return json.dumps(head)[:-1] + f'{", " if head else ""}"{name}": [' + ", ".join(parts) + "]}"


__all__ = ["APIError", "ServeSettings", "create_app"]
