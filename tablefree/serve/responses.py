"""OpenAI response bodies and server-sent-event chunks, built from one request's engine events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request

from .engine import Sequence
from .gate import error_body
from .protocol import APIError

log = logging.getLogger("tablefree.serve")


class RequestRun:
    """One request's sequences: gathers their events into an OpenAI response or a stream of chunks."""

    def __init__(self, tokenizer, model_name: str, metrics, body, plans, sequences: list[Sequence], events: asyncio.Queue,
                 chat: bool, started: float):
        self.tokenizer, self.model_name, self.metrics = tokenizer, model_name, metrics
        self.body, self.plans, self.sequences, self.events = body, plans, sequences, events
        self.chat, self.started = chat, started
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.first_token_at: float | None = None
        self.generated = 0

    def _prompt_of(self, index: int) -> list[int]:
        return self.plans[index // self.body.n][0]

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

    async def collect(self, request: Request):
        try:
            return await self._collect(request)
        except APIError:
            raise
        except Exception as exc:  # a server bug while building the body: a clear 500, never a bare traceback
            log.exception("building a response failed")
            raise APIError(500, f"building the response failed: {type(exc).__name__}: {exc}", None, "server_error") from None

    async def _collect(self, request: Request):
        watcher = asyncio.create_task(self._watch_disconnect(request))
        texts = [""] * len(self.sequences)
        tokens: list[list] = [[] for _ in self.sequences]
        prompt_scores: list = [None] * len(self.sequences)
        finish = [None] * len(self.sequences)
        try:
            async for index, event in self._events():
                texts[index] += event.text
                tokens[index].extend(event.logprobs or [])
                prompt_scores[index] = prompt_scores[index] or event.prompt_logprobs
                finish[index] = event.finish_reason or finish[index]
        finally:
            watcher.cancel()
        choices = []
        for index in range(len(self.sequences)):
            if self.chat:
                logprobs = {"content": [self._chat_logprob(t) for t in tokens[index]]} if self.body.logprobs else None
                choices.append({"index": index, "message": {"role": "assistant", "content": texts[index]},
                                "logprobs": logprobs, "finish_reason": finish[index]})
            else:
                text, logprobs = texts[index], None
                if self.body.echo:
                    text = self.tokenizer.decode(self._prompt_of(index)) + text
                if self.body.logprobs is not None:
                    scored = (prompt_scores[index] or []) + tokens[index]
                    logprobs = self._completion_logprobs(scored, 0)
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish[index]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices, "usage": self._usage()}

    async def stream(self):
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            if self.chat:
                for index in range(len(self.sequences)):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})
            elif self.body.echo:
                for index in range(len(self.sequences)):
                    text = self.tokenizer.decode(self._prompt_of(index))
                    yield _sse({**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]})
            offsets = [0] * len(self.sequences)
            async for index, event in self._events():
                if not (event.text or event.finish_reason or event.logprobs):
                    continue
                if self.chat:
                    delta = {"content": event.text} if event.text else {}
                    logprobs = ({"content": [self._chat_logprob(t) for t in event.logprobs]}
                                if self.body.logprobs and event.logprobs else None)
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
                else:
                    logprobs = None
                    if self.body.logprobs is not None:
                        scored = (event.prompt_logprobs or []) + (event.logprobs or [])
                        logprobs = self._completion_logprobs(scored, offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    choice = {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
                yield _sse({**head, "choices": [choice]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage()})
        except APIError as exc:
            yield _sse(error_body(exc.message, exc.type, exc.status))
        except Exception as exc:  # a server bug while building a chunk: the stream still ends with an error and [DONE]
            log.exception("building a stream chunk failed")
            yield _sse(error_body(f"building the stream failed: {type(exc).__name__}: {exc}", "server_error", 500))
        yield "data: [DONE]\n\n"

    async def _watch_disconnect(self, request: Request):
        """A non-streaming client that hangs up cancels its sequences (streams notice through the send failing)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for seq in self.sequences:
                    seq.cancel()
                return

    def _usage(self) -> dict:
        prompt = sum(len(ids) for ids, _ in self.plans)
        return {"prompt_tokens": prompt, "completion_tokens": self.generated, "total_tokens": prompt + self.generated}

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _completion_logprobs(self, scored, offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for item in scored:
            text = self._token_text(item.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(item.logprob)
            out["top_logprobs"].append({self._token_text(t): v for t, v in item.top} if item.logprob is not None else None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _chat_logprob(self, item) -> dict:
        def entry(token, value):
            text = self._token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "replace"))}

        return {**entry(item.token, item.logprob), "top_logprobs": [entry(t, v) for t, v in item.top]}


def _choice_error(index: int, event) -> APIError:
    if event.finish_reason == "abort":
        return APIError(503, f"choice {index} was not finished: {event.error}; retry shortly", None, "server_busy")
    return APIError(500, f"generation failed for choice {index}: {event.error}", None, "server_error")


def _sse(payload: dict) -> str:
    # ASCII-escaped so text holding U+2028, U+0085, ... cannot split the event in clients that break lines like str.splitlines.
    return f"data: {json.dumps(payload, ensure_ascii=True)}\n\n"
