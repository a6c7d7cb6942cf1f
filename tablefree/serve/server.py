"""`tablefree serve MODEL`: check the flags, bind the port, load the model, run uvicorn until SIGTERM/SIGINT.

What the server bounds (docs/safety.md): connections (--max-connections), a connection's idle time
(--timeout-keep-alive, from the moment it opens), the time a request may take to arrive whole
(--request-read-timeout, against clients that trickle bytes), the body size (--max-body-bytes), the
waiting sequences (--max-queue), the shutdown drain (--shutdown-timeout), and the log (a repeated
message is written once a minute with a count; credentials in URLs and headers are redacted from every line).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h11
import torch
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import TableFreeError, summary
from ..hub import load_model, resolve_model_path
from ..runtime import (DEVICE_HELP, DEVICE_PATTERN, DTYPE_HELP, DTYPE_NAMES, in_passing_thread, pick_device, pick_dtype,
                       resolve_runtime, settle_heap)
from . import DRAFT_TOKENS, ENGINES, PRECISIONS, ServeLimits
from .app import ServeSettings, create_app
from .chat_template import ChatTemplate, ChatTemplateError
from .engine import Engine, end_of_sequence_ids, hand_over, why_not_slots
from .precision import choose_precision
from .engine_process import EngineDead, ProcessEngine
from .protocol import error_body, printable

API_KEY_ENV = "TABLEFREE_API_KEY"
MAX_KEY_FILE_BYTES = 4096
DEFAULT_MAX_CONNECTIONS = 1000
# asyncio accepts up to `backlog` connections per turn of its loop, and one over --max-connections is closed three
# turns later: four such bursts, the listening socket, logs and library internals must fit beside the connections.
BACKLOG = 64
FILES_BESIDES_CONNECTIONS = 4 * BACKLOG + 64

log = logging.getLogger("tablefree.serve")


# ---- flags, checked before anything slow happens ----
def check_flags(args) -> str:
    """The model path, once every flag is known to be usable; otherwise a TableFreeError naming the flag."""
    if args.model and args.model_path and args.model != args.model_path:
        raise TableFreeError(f"two models given ({args.model} and --model-path {args.model_path}); give one")
    model_path = args.model or args.model_path
    if not model_path:
        raise TableFreeError("give the model: tablefree serve MODEL (or --model-path MODEL)")
    if not 0 <= args.port <= 65535:
        raise TableFreeError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.host:
        raise TableFreeError("--host is empty; give an address such as 127.0.0.1 or 0.0.0.0")
    if args.served_model_name is not None and (not args.served_model_name or printable(args.served_model_name) != args.served_model_name):
        raise TableFreeError("--served-model-name must be a non-empty name in valid Unicode")
    minimums = {"--max-batch-size": (args.max_batch_size, 1), "--max-queue": (args.max_queue, 1),
                "--max-body-bytes": (args.max_body_bytes, 1), "--max-model-len": (args.max_model_len, 2),
                "--max-connections": (args.max_connections, 1), "--draft-tokens": (args.draft_tokens, 0)}
    for flag, (value, least) in minimums.items():
        if value is not None and value < least:
            raise TableFreeError(f"{flag} must be at least {least}, got {value}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise TableFreeError(f"--threads must be between 1 and 1024, got {args.threads}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise TableFreeError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    for flag, value, zero_allowed in (("--timeout-keep-alive", args.timeout_keep_alive, False),
                                      ("--request-read-timeout", args.request_read_timeout, False),
                                      ("--shutdown-timeout", args.shutdown_timeout, True)):
        if not (math.isfinite(value) and (value > 0 or zero_allowed and value == 0)):
            raise TableFreeError(f"{flag} must be a finite number of seconds, {'0 or more' if zero_allowed else 'above 0'}; got {value}")
    # Named as the flags here; tablefree.runtime decides what a valid name picks on this machine.
    if not DEVICE_PATTERN.fullmatch(args.device):
        raise TableFreeError(f"unknown --device {args.device!r}; choose {DEVICE_HELP}")
    if args.dtype != "auto" and args.dtype not in DTYPE_NAMES:
        raise TableFreeError(f"unknown --dtype {args.dtype!r}; choose {DTYPE_HELP}")
    for flag, value in (("--head-precision", args.head_precision), ("--body-precision", args.body_precision)):
        if value not in PRECISIONS:
            raise TableFreeError(f"unknown {flag} {value!r}; choose {', '.join(PRECISIONS)}")
    if args.engine not in ENGINES:
        raise TableFreeError(f"unknown --engine {args.engine!r}; choose {', '.join(ENGINES)}")
    return model_path


def check_runtime(args) -> None:
    """The device and dtype's errors (a GPU that is not there, float16 on a CPU) before the port is bound. The thread
    engine's process takes its runtime here; an engine process takes its own, so this one touches no GPU."""
    if args.engine == "thread":
        resolve_runtime(args.device, args.dtype, args.threads)
    else:
        pick_dtype(args.dtype, pick_device(args.device))


def resolve_api_key(args) -> str | None:
    """The key clients must send: --api-key-file, else --api-key, else $TABLEFREE_API_KEY, else none."""
    if args.api_key is not None and args.api_key_file is not None:
        raise TableFreeError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        key, source = read_key_file(args.api_key_file), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, source = args.api_key, "--api-key"
    elif API_KEY_ENV in os.environ:
        key, source = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    key = key.strip()
    if not key:
        raise TableFreeError(f"{source} gives an empty API key; give a key, or none at all to serve without one")
    if not all("!" <= c <= "~" for c in key):
        raise TableFreeError(f"the API key from {source} must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def read_key_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise TableFreeError(f"cannot read --api-key-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise TableFreeError(f"--api-key-file {path} is over {MAX_KEY_FILE_BYTES} bytes; it should hold the key alone")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TableFreeError(f"--api-key-file {path} is not text; it should hold the key alone") from None


def connection_budget(requested: int | None) -> int:
    """--max-connections, checked against the open-file limit (raised to the hard limit when that makes room)."""
    import resource

    wanted = (requested or DEFAULT_MAX_CONNECTIONS) + FILES_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    room = wanted if soft == resource.RLIM_INFINITY else soft - FILES_BESIDES_CONNECTIONS
    if requested is None:
        if room < 1:
            raise TableFreeError(f"the open-file limit ({soft}, ulimit -n) leaves no room for connections; raise it")
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if requested > room:
        raise TableFreeError(f"--max-connections {requested} needs {wanted} open files, but this process may open {soft} "
                             f"(ulimit -n); lower --max-connections to {room} or raise the limit")
    return requested


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port fails at once, not after the load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, ValueError) as exc:  # gaierror, and UnicodeError or NUL characters in the name
        raise TableFreeError(f"--host {host!r} is not an address to listen on ({exc}); use for example 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may bind while old connections linger
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TableFreeError(f"port {port} on {host} is already in use; stop what listens there or choose another --port") from None
        raise TableFreeError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; choose another --host or --port") from None
    return sock


# ---- the model ----
@dataclass(frozen=True)
class EngineSpec:
    """The model to serve and how the engine runs it (the serve command's flags), as plain data an engine process gets."""

    model_path: str
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    trust_remote_code: bool = False
    head_precision: str = "float32"
    body_precision: str = "float32"
    max_model_len: int | None = None  # None: the model's context
    max_batch_size: int = ServeLimits.max_batch_size
    max_queue: int = ServeLimits.max_queue
    seed: int | None = None
    log_level: str = "info"
    draft_tokens: int = DRAFT_TOKENS


@dataclass(frozen=True)
class EngineFacts:
    """What the server needs to know of the loaded model besides its tokenizer."""

    max_model_len: int
    vocab_size: int
    eos_ids: frozenset[int]
    cached: bool  # False: the uncached path (a forward that takes token ids alone)
    precision: str  # which weights run, and why
    runtime: str  # Runtime.describe() of the process that runs the model


def load_engine(spec: EngineSpec, deliver=hand_over) -> tuple[Engine, object, EngineFacts]:
    """(engine, tokenizer, facts): the model loaded as `spec` says, in this process; `deliver` as Engine takes it.
    The loading runs in a passing thread, so the engine's thread holds the process's only OpenMP pool."""
    return in_passing_thread(_load_engine, spec, deliver)


def _load_engine(spec: EngineSpec, deliver) -> tuple[Engine, object, EngineFacts]:
    runtime = resolve_runtime(spec.device, spec.dtype, spec.threads)
    model, tokenizer = load_for_serving(spec.model_path, runtime.dtype, runtime.device, spec.trust_remote_code)
    max_model_len = context_length(model.config, spec.max_model_len)
    try:
        precision = choose_precision(model, tokenizer, spec.head_precision, spec.body_precision, why_not_slots(model))
    except ValueError as exc:
        raise TableFreeError(f"--head-precision {spec.head_precision} --body-precision {spec.body_precision}: {exc}") from None
    engine = Engine(model, tokenizer, max_batch_size=spec.max_batch_size, max_model_len=max_model_len,
                    max_queue=spec.max_queue, seed=spec.seed, threads=spec.threads, head=precision.head,
                    lower_body=precision.lower_body, draft_tokens=spec.draft_tokens, deliver=deliver)
    why = precision.why if precision.head is None else f"{precision.why}; the head: {precision.head.kind}"
    if precision.lower_body:
        problem = engine.native_problem
        why += "; the body: native" if problem is None else f"; the body: torch's int8 kernels (not native: {problem})"
    facts = EngineFacts(max_model_len, model.config.vocab_size, frozenset(end_of_sequence_ids(model, tokenizer)),
                        engine.cached, why, runtime.describe())
    return engine, tokenizer, facts


def start_engine(spec: EngineSpec, kind: str) -> tuple[Engine | ProcessEngine, object, EngineFacts]:
    """(engine, tokenizer, facts) of the engine `kind` (one of ENGINES): the model loaded here, or in an engine
    process while this one loads the tokenizer alone."""
    if kind == "thread":
        return load_engine(spec)
    resolve_model_path(spec.model_path)  # the commonest mistake, a wrong path, said without starting a process
    engine = ProcessEngine(spec)
    try:
        try:
            tokenizer = load_serving_tokenizer(spec.model_path, spec.trust_remote_code)  # while the model loads there
        except TableFreeError:
            wait_until_loaded(engine)  # when both fail, the engine process's error comes first, as in load_for_serving
            raise
        return engine, tokenizer, wait_until_loaded(engine)
    except BaseException:
        engine.stop()
        raise


def wait_until_loaded(engine: ProcessEngine) -> EngineFacts:
    """The facts of the model the engine process loaded, or its error as a TableFreeError."""
    try:
        return engine.ready()
    except EngineDead as exc:
        raise TableFreeError(str(exc)) from None


def load_serving_tokenizer(model_path: str, trust_remote_code: bool):
    """The tokenizer `load_for_serving` loads with the model, alone."""
    path = resolve_model_path(model_path)
    if trust_remote_code:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        except (OSError, ValueError, KeyError) as exc:
            raise TableFreeError(f"transformers could not load {path}: {summary(exc)}") from None
    from ..tokenizer import load_tokenizer

    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise TableFreeError(f"{model_path} has no tokenizer files; the server needs one to read prompts")
    return load_tokenizer(path)


def load_for_serving(model_path: str, dtype: torch.dtype, device: torch.device | str, trust_remote_code: bool):
    """(model, tokenizer): this project's models through hub.load_model; any causal LM with --trust-remote-code
    (one whose forward takes token ids alone runs on the engine's uncached path)."""
    if not trust_remote_code:
        model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model_path(model_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        except (OSError, ValueError, KeyError) as exc:
            raise TableFreeError(f"transformers could not load {path}: {summary(exc)}") from None
    if tokenizer is None:
        raise TableFreeError(f"{model_path} has no tokenizer files; the server needs one to read prompts")
    return model, tokenizer


# What configs call the context length: transformers' name, GPT-2's, nanoGPT's.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "block_size")


def context_length(config, requested: int | None) -> int:
    known = next((getattr(config, name) for name in CONTEXT_FIELDS if isinstance(getattr(config, name, None), int)), None)
    if requested is not None:
        if known is not None and requested > known:
            raise TableFreeError(f"--max-model-len {requested} is over the model's context of {known} tokens")
        return requested
    if known is None:
        raise TableFreeError(f"the model config has none of {', '.join(CONTEXT_FIELDS)}; pass --max-model-len")
    return known


def load_chat_template(tokenizer, max_body_bytes: int) -> ChatTemplate | None:
    """The tokenizer's chat template in the bounded sandbox (None without one): what one rendering may build is
    bounded by twice the largest body, room for the messages and the template's own text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return ChatTemplate(tokenizer, limit=2 * max_body_bytes)
    except ChatTemplateError as exc:
        raise TableFreeError(f"the model's chat template cannot be used: {exc}") from None


def end_of_turn_ids(tokenizer, template: ChatTemplate | None) -> set[int]:
    """The special token the chat template puts after a reply (none without one). Rendering that reply tries the
    template once, so a template that fails is an error at start."""
    turn_ids: set[int] = set()
    if template is not None:
        marker = "\u2063reply\u2063"
        try:
            text = template.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], False)
        except ChatTemplateError as exc:
            raise TableFreeError(f"the model's chat template fails on a one-line chat: {exc}") from None
        tail = tokenizer.encode(text[text.rfind(marker) + len(marker):], add_special_tokens=False)
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(tokenizer.all_special_ids)
        if tail and tail[0] in special:
            turn_ids.add(tail[0])
    return turn_ids


# ---- connections and the log ----
class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the bounds it lacks.

    uvicorn arms its keep-alive timer only after a response, so a connection that never sends a request
    stays open forever: here the timer runs from the moment a connection opens. A request must also
    arrive whole (head and body) within `read_timeout` of the connection waiting for it, however its
    bytes trickle in; connections beyond `max_connections` are closed as soon as they are accepted; and
    the 400 uvicorn writes itself for malformed HTTP is JSON like every other error.
    """

    def __init__(self, *args, max_connections: int, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections, self.read_timeout = max_connections, read_timeout
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("%d connections are open (--max-connections); closing new ones at once", self.max_connections)
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body("malformed HTTP/1.1 request", "invalid_request_error", 400)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _watch_request(self) -> None:
        """Run the read deadline while the client owes us (part of) a request, and only then."""
        waiting = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
        if waiting and self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)
        elif not waiting:
            self._cancel_read_deadline()

    def _cancel_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection that did not send a whole request within %g s (--request-read-timeout)", self.read_timeout)
            self.transport.close()


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per `window` seconds; the next one to pass says how many were held back.

    A flood of one error (accept() failing at the open-file limit, a client sending junk in a loop) then
    costs a line a minute instead of megabytes a second.
    """

    def __init__(self, window: float = 60.0, remembered: int = 1024):
        super().__init__()
        self.window, self.remembered = window, remembered
        self.seen: OrderedDict[tuple, list] = OrderedDict()  # message -> [when it last passed, repeats held back since]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed call; the handler reports it when formatting
            text = str(record.msg)
        key, now = (record.name, record.levelno, text), time.monotonic()
        with self.lock:
            entry = self.seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            held = entry[1] if entry is not None else 0
            self.seen[key] = [now, 0]
            self.seen.move_to_end(key)
            while len(self.seen) > self.remembered:
                self.seen.popitem(last=False)
        if held:
            record.msg, record.args = f"{text} [{held} more like this in the last {self.window:g} s were not logged]", None
        return True


# Query, matrix and path parameters whose names hold one of these words (percent-decoded, case and punctuation
# ignored) carry credentials: api_key, apikey, access_token, X-Amz-Signature, client_secret, password, auth, ...
CREDENTIAL_WORDS = ("key", "token", "auth", "pass", "pwd", "secret", "sig", "credential", "session", "cookie", "jwt",
                    "bearer")
REDACTED = "[redacted]"
URL_PARAMETER = re.compile(r"(?P<head>[?&;/](?P<name>[^=&;?#/\s\"'<>]+)=)(?P<value>[^&;#\s\"'<>]*)")
# A scheme is short and user:password@ ends before the next "/": a hostile line costs time linear in its length.
URL_USERINFO = re.compile(r"(?i)(?P<head>\b[a-z][a-z0-9+.-]{0,31}://)(?P<value>[^/\s?#]*)@")
CREDENTIAL_HEADER = re.compile(r"(?i)(?P<head>\b(?:proxy-)?authorization|\bx-api-key|\bapi-key|\b(?:set-)?cookie)"
                               r"(?P<separator>['\"]?\s*[:=,]\s*(?:b?['\"])?)(?P<value>[^\r\n'\"]+)")


def credential_name(name: str) -> bool:
    """Whether a URL parameter of this name carries a credential (see CREDENTIAL_WORDS)."""
    for _ in range(3):  # %2561pi_key is api_key twice encoded
        name = urllib.parse.unquote_plus(name)
    folded = re.sub(r"[^0-9a-z]", "", name.lower())
    return any(word in folded for word in CREDENTIAL_WORDS)


def spelled_any_way(secret: str) -> re.Pattern:
    """`secret` as itself or with any of its characters percent-encoded (as a URL may carry it)."""
    return re.compile("".join(f"(?:{re.escape(c)}|%(?i:{ord(c):02x}))" for c in secret))


def redact(text: str, secrets: tuple[re.Pattern, ...] = ()) -> str:
    """`text` with credentials blanked: the server's own API key wherever it appears (`secrets`), credential
    parameters of URLs, a URL's user:password@ and credential headers (Authorization, Cookie, X-Api-Key)."""
    for secret in secrets:
        text = secret.sub(REDACTED, text)
    text = URL_PARAMETER.sub(lambda m: m["head"] + REDACTED if credential_name(m["name"]) else m[0], text)
    text = URL_USERINFO.sub(lambda m: m["head"] + REDACTED + "@", text)
    return CREDENTIAL_HEADER.sub(lambda m: m["head"] + m["separator"] + REDACTED, text)


class RedactingFormatter(logging.Formatter):
    """Formats a record as logging.Formatter does, then blanks its credentials with `redact`, traceback included."""

    def __init__(self, fmt: str, secrets: tuple[str, ...] = ()):
        super().__init__(fmt)
        self.secrets = tuple(spelled_any_way(secret) for secret in sorted(secrets, key=len, reverse=True) if secret)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def log_handler(secrets: tuple[str, ...] = (), stream=None) -> logging.Handler:
    """The server's one log handler: credentials redacted from every line, a repeated message held back."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s", secrets))
    handler.addFilter(RepeatFilter())
    return handler


def configure_logging(level: str, secrets: tuple[str, ...] = ()) -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(secrets)], force=True)


# ---- the command ----
def serve_command(args) -> int:
    import uvicorn

    model_path = check_flags(args)
    api_key = resolve_api_key(args)
    check_runtime(args)
    max_connections = connection_budget(args.max_connections)
    listener = listen(args.host, args.port)
    spec = EngineSpec(model_path, args.device, args.dtype, args.threads, args.trust_remote_code, args.head_precision,
                      args.body_precision, args.max_model_len, args.max_batch_size, args.max_queue, args.seed,
                      args.log_level, args.draft_tokens)
    engine = None
    try:
        engine, tokenizer, facts = start_engine(spec, args.engine)
        template = load_chat_template(tokenizer, args.max_body_bytes)
        settings = ServeSettings(
            model_name=args.served_model_name or printable(str(model_path)), max_model_len=facts.max_model_len,
            vocab_size=facts.vocab_size, api_key=api_key, max_body_bytes=args.max_body_bytes,
            eos_ids=facts.eos_ids, end_of_turn_ids=frozenset(end_of_turn_ids(tokenizer, template)), chat_template=template,
        )
        app = create_app(engine, tokenizer, settings)
    except BaseException:
        listener.close()
        if isinstance(engine, ProcessEngine):
            engine.stop()
        raise
    configure_logging(args.log_level, (api_key,) if api_key else ())
    host, port = listener.getsockname()[:2]
    address = f"[{host}]" if ":" in host else host
    path_cost = "" if facts.cached else ", uncached: forward takes token ids alone"
    where = facts.runtime if args.engine == "thread" else f"{facts.runtime}, engine process"
    print(printable(f"serving {settings.model_name} ({Path(str(model_path)).name}, {where}, "
                    f"context {facts.max_model_len}{path_cost}; {facts.precision}) on http://{address}:{port}"), flush=True)
    protocol = functools.partial(GuardedH11Protocol, max_connections=max_connections, read_timeout=args.request_read_timeout)
    config = uvicorn.Config(app, http=protocol, ws="none", lifespan="on", log_config=None, log_level=args.log_level,
                            timeout_keep_alive=args.timeout_keep_alive, timeout_graceful_shutdown=args.shutdown_timeout,
                            backlog=BACKLOG)
    server = uvicorn.Server(config)
    settle_heap()  # the model, tokenizer and app are loaded: no full collection walks them again
    if isinstance(engine, ProcessEngine):
        engine.on_death = lambda: setattr(server, "should_exit", True)  # drain what is left, then exit with the error
    server.run(sockets=[listener])
    if engine.failure is not None:
        raise TableFreeError(f"{engine.failure}; the server stopped (its requests in flight were answered with 500)")
    return 0
