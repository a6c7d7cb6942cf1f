"""The FastAPI application: OpenAI-compatible routes over one Engine; every client mistake is a 4xx JSON error."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueueFull, Sequence
from .gate import RequestGate, error_body
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    SamplingFields,
    TokenizeRequest,
)
from .responses import RequestRun
from .sampling import SamplingParams

MAX_SEQUENCES_PER_REQUEST = 64


@dataclass
class ServeSettings:
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    eos_ids: frozenset[int] = frozenset()
    end_of_turn_ids: frozenset[int] = frozenset()  # tokens that close a chat turn (e.g. [EOT]); chat stops there too


def create_app(engine: Engine, tokenizer, settings: ServeSettings) -> FastAPI:
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()  # uvicorn has already drained the in-flight requests by now

    errors = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
              413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
    app = FastAPI(title="tablefree serve", version="1", lifespan=lifespan, responses=errors)
    app.add_middleware(RequestGate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(error_body(exc.message, exc.type, exc.status, exc.param), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        if not param and first.get("type") == "model_attributes_type":
            message = "the request body must be a JSON object (send it with Content-Type: application/json)"
        return JSONResponse(error_body(message, "invalid_request_error", 400, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", exc.status_code), status_code=exc.status_code)

    server = _Routes(engine, tokenizer, settings, metrics)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics_text)
    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    return app


class _Routes:
    def __init__(self, engine: Engine, tokenizer, settings: ServeSettings, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.settings, self.metrics = engine, tokenizer, settings, metrics
        self.created = int(time.time())

    async def health(self):
        return {"status": "ok"}

    async def metrics_text(self):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self):
        card = {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "tablefree",
                "max_model_len": self.settings.max_model_len}
        return {"object": "list", "data": [card]}

    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        if body.messages is not None:
            ids = self._chat_ids(body.messages, True)
        elif body.prompt is not None:
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either 'prompt' or 'messages'", "prompt")
        return {"count": len(ids), "max_model_len": self.settings.max_model_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        self._check_ids(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        if body.suffix:
            raise APIError(400, "'suffix' (fill-in-the-middle) is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (candidates are not ranked)", "best_of")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens=0 only makes sense with echo=true (scoring the prompt)", "max_tokens")
        prompts = self._prompt_ids(body.prompt)
        want_logprobs = body.logprobs is not None
        plans = []
        for ids in prompts:
            max_tokens = self._max_tokens(len(ids), body.max_tokens)
            params = self._params(body, max_tokens, body.logprobs if want_logprobs else None)
            params.prompt_logprobs = body.echo and want_logprobs
            plans.append((ids, params))
        return await self._serve(request, body, plans, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        if body.tools:
            raise APIError(400, "tool calling is not supported by this server", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported (no JSON or schema mode)", "response_format")
        ids = self._chat_ids(body.messages, body.add_generation_prompt)
        if not ids:
            raise APIError(400, "the rendered conversation is empty", "messages")
        max_tokens = self._max_tokens(len(ids), body.max_completion_tokens or body.max_tokens)
        count = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, max_tokens, count)
        return await self._serve(request, body, [(ids, params)], chat=True)

    # ---- validation ----
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           "model", "model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.settings.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.settings.vocab_size})", param)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty; give at least one token", "prompt")
            self._check_ids(ids, "prompt")
        return prompts

    def _chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        conversation = [
            {"role": m.role, "content": m.content if isinstance(m.content, str)
             else "".join(part.text for part in m.content or [])}
            for m in messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # jinja's TemplateError and the template's own raise_exception both land here
            raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        room = self.settings.max_model_len - prompt_len
        if room < 1 and requested != 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens, the model's context is {self.settings.max_model_len}: "
                                "no room to generate", "prompt")
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {self.settings.max_model_len} tokens; the prompt has "
                                f"{prompt_len} and max_tokens asks for {requested} more", "max_tokens")
        return requested

    def _params(self, body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(s == "" for s in stop):
            raise APIError(400, "stop strings must not be empty", "stop")
        stop_ids = list(body.stop_token_ids or [])
        self._check_ids(stop_ids, "stop_token_ids")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or not int(key) < self.settings.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {self.settings.vocab_size})", "logit_bias")
            bias[int(key)] = value
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=bias, seed=body.seed, stop=stop,
            stop_token_ids=stop_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )

    # ---- generation ----
    async def _serve(self, request: Request, body, plans, chat: bool):
        if len(plans) * body.n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{len(plans)} prompts x n={body.n} is over {MAX_SEQUENCES_PER_REQUEST} sequences per request", "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        eos = set(self.settings.eos_ids) | (set(self.settings.end_of_turn_ids) if chat else set())
        sequences = []
        for p, (ids, params) in enumerate(plans):
            for i in range(body.n):
                index = p * body.n + i
                sink = lambda event, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, event))  # noqa: E731
                sequences.append(Sequence(ids, params, self.tokenizer, sink, eos, choice=i))
        try:
            self.engine.submit(sequences)
        except QueueFull as exc:
            raise APIError(503, f"server busy: {exc}; retry shortly", None, "server_busy") from None
        except ValueError as exc:
            raise APIError(400, str(exc), "n") from None
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in plans))
        run = RequestRun(self.tokenizer, self.settings.model_name, self.metrics, body, plans, sequences, events, chat,
                         time.perf_counter())
        if body.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream")
        return await run.collect(request)


__all__ = ["APIError", "ServeSettings", "create_app"]
