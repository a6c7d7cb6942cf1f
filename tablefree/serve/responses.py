"""OpenAI response bodies and server-sent-event chunks (the types of protocol), built from one request's engine events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from .engine import Sequence
from .protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
    Usage,
    error_body,
)

log = logging.getLogger("tablefree.serve")


class RequestRun:
    """One request's sequences (choice i is `sequences[i]`): gathers their events into a response or a stream of chunks.

    `plans` are the request's (prompt ids, sampling params), one per prompt; `chat` says which API answers.
    """

    def __init__(self, tokenizer, model_name: str, metrics, body, plans, sequences: list[Sequence], events: asyncio.Queue,
                 chat: bool, started: float):
        self.tokenizer, self.model_name, self.metrics = tokenizer, model_name, metrics
        self.body, self.sequences, self.events, self.chat, self.started = body, sequences, events, chat, started
        self.prompt_tokens = sum(len(ids) for ids, _ in plans)  # each prompt once, however many choices it has
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.first_token_at: float | None = None
        self.generated = 0
        self.token_texts: dict[int, str] = {}  # each id decoded once: a body may name the same ids a million times

    async def _events(self):
        """(index, event) until every sequence has finished; stops the sequences if the consumer goes away."""
        remaining = len(self.sequences)
        try:
            while remaining:
                index, event = await self.events.get()
                if event.token_ids:
                    self.generated += len(event.token_ids)
                    self.metrics.generated_tokens.inc(len(event.token_ids))
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                        self.metrics.time_to_first_token.observe(self.first_token_at - self.started)
                if event.error:  # one failed choice fails the request; `finally` cancels its siblings
                    raise _choice_error(index, event)
                if event.finish_reason:
                    remaining -= 1
                yield index, event
        finally:
            for seq in self.sequences:
                seq.cancel()
            if self.first_token_at is not None and self.generated > 1:
                self.metrics.time_per_output_token.observe((time.perf_counter() - self.first_token_at) / (self.generated - 1))

    async def respond(self, request: Request) -> Response:
        """The whole body as JSON, built and encoded on a worker thread: a body of tens of megabytes (n=16 choices of
        echoed 1,024-token prompts with 20 logprobs each) must not hold up the event loop, and /health with it."""
        body = await self.collect(request)
        return Response(await asyncio.to_thread(json_in_pieces, body), media_type="application/json")

    async def collect(self, request: Request) -> Completion | ChatCompletion:
        try:
            gathered = await self._gather(request)
            return await asyncio.to_thread(self._body, *gathered)
        except APIError:
            raise
        except Exception as exc:  # a server bug while building the body: a clear 500, never a bare traceback
            log.exception("building a response failed")
            raise APIError(500, f"building the response failed: {type(exc).__name__}: {exc}", None, "server_error") from None

    async def _gather(self, request: Request) -> tuple[list, list, list]:
        """Each choice's text, scored tokens and finish reason, once every choice has finished."""
        watcher = asyncio.create_task(self._watch_disconnect(request))
        texts = [""] * len(self.sequences)
        scored: list[list] = [[] for _ in self.sequences]  # the prompt's scores (echo), then each generated token's
        finish = [None] * len(self.sequences)
        try:
            async for index, event in self._events():
                texts[index] += event.text
                scored[index].extend((event.prompt_logprobs or []) + (event.logprobs or []))
                finish[index] = event.finish_reason or finish[index]
        finally:
            watcher.cancel()
        return texts, scored, finish

    def _body(self, texts: list, scored: list, finish: list) -> Completion | ChatCompletion:
        head = {"id": self.id, "created": self.created, "model": self.model_name, "usage": self._usage()}
        if self.chat:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), logprobs=self._chat_logprobs(scored[i]),
                                  finish_reason=finish[i]) for i in range(len(self.sequences))]
            return ChatCompletion(**head, choices=choices)
        tops: dict = {}  # the n choices of an echoed prompt share its scores: each score's top dict is built once
        choices = [CompletionChoice(index=i, text=self._echo(i) + texts[i], logprobs=self._completion_logprobs(scored[i], 0, tops),
                                    finish_reason=finish[i]) for i in range(len(self.sequences))]
        return Completion(**head, choices=choices)

    async def stream(self):
        head = {"id": self.id, "created": self.created, "model": self.model_name}
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        chunk_type = ChatCompletionChunk if self.chat else Completion
        try:
            for index in range(len(self.sequences)):  # the role (chat) or the echoed prompt opens each choice
                if self.chat:
                    opening = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
                    yield _sse(ChatCompletionChunk(**head, choices=[opening]).model_dump())
                elif self.body.echo:
                    yield _sse(Completion(**head, choices=[CompletionChoice(index=index, text=self._echo(index))]).model_dump())
            offsets = [0] * len(self.sequences)  # characters of each choice's logprob tokens sent so far
            async for index, event in self._events():
                if not (event.text or event.finish_reason or event.logprobs):
                    continue
                if event.prompt_logprobs:  # a whole prompt's scores: built off the event loop, as a body is
                    yield await asyncio.to_thread(self._chunk, head, index, event, offsets)
                else:
                    yield self._chunk(head, index, event, offsets)
            if include_usage:
                yield _sse(chunk_type(**head, choices=[], usage=self._usage()).model_dump())
        except APIError as exc:
            yield _sse(exc.body())
        except Exception as exc:  # a server bug while building a chunk: the stream still ends with an error and [DONE]
            log.exception("building a stream chunk failed")
            yield _sse(error_body(f"building the stream failed: {type(exc).__name__}: {exc}", "server_error", 500))
        yield "data: [DONE]\n\n"

    def _chunk(self, head: dict, index: int, event, offsets: list[int]) -> str:
        """One event of choice `index` as a stream chunk; `offsets` holds each choice's characters sent so far."""
        scored = (event.prompt_logprobs or []) + (event.logprobs or [])
        if self.chat:
            choice = ChatChunkChoice(index=index, delta=ChatDelta(content=event.text or None),
                                     logprobs=self._chat_logprobs(scored) if scored else None,
                                     finish_reason=event.finish_reason)
            return _sse(ChatCompletionChunk(**head, choices=[choice]).model_dump())
        logprobs = self._completion_logprobs(scored, offsets[index])
        if logprobs is not None:
            offsets[index] += sum(len(t) for t in logprobs.tokens)
        choice = CompletionChoice(index=index, text=event.text, logprobs=logprobs, finish_reason=event.finish_reason)
        return _sse(Completion(**head, choices=[choice]).model_dump())

    async def _watch_disconnect(self, request: Request):
        """A non-streaming client that hangs up cancels its sequences (streams notice through the send failing)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for seq in self.sequences:
                    seq.cancel()
                return

    def _usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.generated,
                     total_tokens=self.prompt_tokens + self.generated)

    def _echo(self, index: int) -> str:
        return self.tokenizer.decode(self.sequences[index].prompt_ids) if self.body.echo else ""

    def _token_text(self, token: int) -> str:
        text = self.token_texts.get(token)
        if text is None:
            text = self.token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _completion_logprobs(self, scored, offset: int, tops: dict | None = None) -> CompletionLogprobs | None:
        """Logprobs of `scored` tokens whose text starts at character `offset`; None when the request asked for none.

        `tops` keeps each score's top dict by the score's id, for scores that all stay alive while it is used.
        """
        if self.body.logprobs is None:
            return None
        out = CompletionLogprobs()
        tops = {} if tops is None else tops
        for item in scored:
            text = self._token_text(item.token)
            out.tokens.append(text)
            out.token_logprobs.append(item.logprob)
            top = tops.get(id(item))
            if top is None and item.logprob is not None:
                top = tops[id(item)] = {self._token_text(t): v for t, v in item.top}
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, scored) -> ChatLogprobs | None:
        """Chat's top_logprobs are the first k of each token's list, as vLLM's: the chosen token, then the likeliest."""
        if not self.body.logprobs:
            return None
        count = self.body.top_logprobs or 0

        def entry(token: int, value: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "replace"))}

        return ChatLogprobs(content=[ChatTokenLogprob(**entry(item.token, item.logprob),
                                                      top_logprobs=[TopLogprob(**entry(t, v)) for t, v in item.top[:count]])
                                     for item in scored])


def _choice_error(index: int, event) -> APIError:
    if event.finish_reason == "abort":
        return APIError(503, f"choice {index} was not finished: {event.error}; retry shortly", None, "server_busy")
    return APIError(500, f"generation failed for choice {index}: {event.error}", None, "server_error")


def json_in_pieces(body: Completion | ChatCompletion) -> str:
    """`body` as JSON, encoded a choice at a time: one encoding call of 34 MB would hold the GIL, and so the event
    loop, for its whole length."""
    head = json.dumps(body.model_dump(mode="json", exclude={"choices"}))
    choices = ", ".join(choice.model_dump_json() for choice in body.choices)
    return head[:-1] + f', "choices": [{choices}]}}'


def _sse(payload: dict) -> str:
    # ASCII-escaped so text holding U+2028, U+0085, ... cannot split the event in clients that break lines like str.splitlines.
    return f"data: {json.dumps(payload, ensure_ascii=True)}\n\n"
