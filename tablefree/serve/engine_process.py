"""The engine in a process of its own (`tablefree serve --engine process`): the HTTP server keeps one core, the forward
passes, sampling, detokenising and stop strings another, instead of sharing one interpreter lock.

The child process is started with "spawn" (a fork of a process whose OpenMP threads have run can hang), loads the model
by the serve command's own path (`server.load_engine`), runs the real `Engine` and sends each step's events back in one
message (two when the step prefilled new sequences: their first tokens go out before the decode). The parent's
`ProcessEngine` has the `Engine`'s interface for the app: `submit` sends a request's sequences as plain data (ids,
sampling fields, choice), `Sequence.cancel` sends a cancellation, and a reader thread hands each message's events to
the sequences' sinks as the `Engine` would. Measured against the thread engine: docs/architecture.md.

Failures: a model that fails to load is the same one-line error as with the thread engine. If the engine process dies
(killed, out of memory), every sequence it was serving ends with an error event (its request gets a 500 naming the
death), /health answers 503, new requests 503, and the server shuts down and exits with an error, for its supervisor to
restart: a model that killed its process once is likely to again, and a restart is the supervisor's policy to set. The
engine process follows its parent: it ignores SIGINT and SIGTERM (the parent drains requests, then stops it) and exits
when the parent's pipe closes or the parent is gone, so it never outlives the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

from .engine import QueueFull, Sequence, SequenceEvent, hand_over

log = logging.getLogger("tablefree.serve")

PARENT_POLL_S = 1.0  # how often the engine process checks that its parent is alive
STOP_WAIT_S = 60.0  # how long `stop` waits for the engine process to abort its sequences and exit before killing it


class EngineDead(Exception):
    """The engine process is gone; nothing more can be served."""


class ProcessEngine:
    """The `Engine`'s interface in this process, its work in another. Construct it to start loading; `ready` waits."""

    def __init__(self, spec):
        """`spec`: a server.EngineSpec, the model and how to run it."""
        self.spec = spec
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(target=run_engine_process, args=(child_conn, spec, os.getpid()),
                                        name="tablefree-engine", daemon=True)
        self._process.start()
        child_conn.close()  # the child's end lives in the child alone: its exit is this end's EOF
        self.facts = None
        self.on_death = None  # called (on the reader thread) once the engine process has died
        self._send_lock = threading.Lock()
        self._sequences: dict[int, Sequence] = {}  # id -> sequence, until its last event
        self._ids: dict[Sequence, int] = {}  # sequence -> id, for cancellations
        self._next_id = 0
        self._sent = 0  # sequences sent to the engine process
        self._received = self._waiting = self._running = 0  # as the engine process last reported
        self._draft_counts = (0, 0)
        self._stopping = False
        self._failure: str | None = None
        self._reader = threading.Thread(target=self._read, name="tablefree-engine-reader", daemon=True)

    def ready(self):
        """Waits until the engine process has loaded the model: its EngineFacts, or the error it failed with."""
        while not self._conn.poll(0.2):
            if not self._process.is_alive():
                self._process.join()
                raise EngineDead(f"the engine process exited ({exit_status(self._process.exitcode)}) while loading the "
                                 f"model")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineDead(f"the engine process exited ({exit_status(self._process.exitcode)}) while loading the "
                             f"model") from None
        if kind == "error":
            self._process.join(5)
            raise value
        self.facts = value
        return value

    # ---- the Engine's interface ----
    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        """Asks the engine process to abort what it serves and exit; waits for it (and kills it if it will not)."""
        with self._send_lock:
            self._stopping = True
            try:
                self._conn.send(("stop",))
            except OSError:  # already gone
                pass
        if self._reader.is_alive():
            self._reader.join(STOP_WAIT_S)
        self._process.join(0 if self._reader.is_alive() else STOP_WAIT_S)
        if self._process.is_alive():
            log.warning("the engine process did not exit within %g s; killing it", STOP_WAIT_S)
            self._process.kill()
            self._process.join()
        self._conn.close()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queues one request's sequences in the engine process (refused here when its queue is known to be full)."""
        plain = []
        with self._send_lock:
            if self._failure is not None:
                raise EngineDead(self._failure)
            if len(sequences) > self.spec.max_queue:
                raise ValueError(f"{len(sequences)} sequences in one request is over the queue's bound of "
                                 f"{self.spec.max_queue}")
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.waiting + len(sequences) > self.spec.max_queue:
                raise QueueFull(f"{self.waiting} sequences are waiting (limit {self.spec.max_queue})")
            for seq in sequences:
                seq.on_cancel = self._cancel
                self._sequences[self._next_id], self._ids[seq] = seq, self._next_id
                plain.append((self._next_id, seq.prompt_ids, seq.params, seq.eos_ids, seq.choice))
                self._next_id += 1
            self._sent += len(sequences)
            try:
                self._conn.send(("submit", plain))
            except OSError:  # the engine process is gone; the reader thread ends these sequences with the news
                pass

    @property
    def waiting(self) -> int:
        """Sequences not yet in the batch: those on their way to the engine process and those waiting in it."""
        return self._sent - self._received + self._waiting

    @property
    def running(self) -> int:
        return self._running

    @property
    def draft_counts(self) -> tuple[int, int]:
        return self._draft_counts

    @property
    def cached(self) -> bool:
        return self.facts.cached

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more, or None while it can."""
        return self._failure

    # ---- the event loop's threads ----
    def _cancel(self, seq: Sequence) -> None:
        sid = self._ids.get(seq)
        if sid is None or seq.finished:
            return
        self._send(("cancel", [sid]))

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except OSError:  # the engine process is gone; the reader thread says so to every sequence
                pass

    # ---- the reader thread ----
    def _read(self) -> None:
        """Hands each message's events to their sequences until the engine process closes its end."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(*message[1:])
            except Exception as exc:  # a bug here would leave every request waiting: end them all, loudly
                log.exception("the server could not hand out the engine process's events; stopping it")
                self._process.kill()
                self._ended(f"the server could not read the engine process's events ({type(exc).__name__}: {exc})")
                return
        self._ended()

    def _dispatch(self, events: list, counts: tuple) -> None:
        self._received, self._waiting, self._running, *drafts = counts
        self._draft_counts = tuple(drafts)
        outbox, ids = [], []
        for sid, event in events:
            seq = self._sequences.get(sid)
            if seq is None:
                continue
            if event.finish_reason:
                del self._sequences[sid], self._ids[seq]
            if seq.finished:
                continue
            seq.finished = bool(event.finish_reason)
            outbox.append((seq, event))
            ids.append(sid)
        hand_over(outbox)
        # A sink that refused its event ended its sequence here: the engine process stops it too.
        refused = [sid for sid, (seq, event) in zip(ids, outbox) if seq.finished and not event.finish_reason]
        if refused:
            self._send(("cancel", refused))

    def _ended(self, failure: str | None = None) -> None:
        """The engine process has closed its end: by `stop`, by dying, or killed for `failure`."""
        self._process.join(5)
        self._running = self._waiting = 0
        died = failure is not None or not self._stopping
        if died:
            message = failure or f"the engine process died ({exit_status(self._process.exitcode)})"
            log.error("%s; every request it was serving failed; the server shuts down", message)
        else:
            message = "the server stopped"
        with self._send_lock:
            self._failure = message if died else None
            left, self._sequences, self._ids = list(self._sequences.values()), {}, {}
            self._received = self._sent
        for seq in left:
            seq.finished = True
        finish = "error" if died else "abort"
        hand_over([(seq, SequenceEvent("", [], finish_reason=finish, error=message)) for seq in left])
        if died and self.on_death is not None:
            self.on_death()


def exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# ---- the engine process ----
def run_engine_process(conn, spec, parent: int) -> None:
    """The engine process: loads the model, sends ("ready", facts) or ("error", exception), then serves the parent's
    messages until it says stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides what stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent drains in-flight requests first, then stops this
    threading.Thread(target=_watch_parent, args=(parent,), name="tablefree-parent-watch", daemon=True).start()
    from .. import register_auto_classes
    from ..cli import quiet_libraries
    from ..errors import TableFreeError, summary
    from ..runtime import settle_heap
    from .server import configure_logging, load_engine

    side = _EngineSide(conn)
    try:
        register_auto_classes()
        quiet_libraries()
        engine, _, facts = load_engine(spec, deliver=side.deliver)
    except (TableFreeError, OSError) as exc:
        conn.send(("error", exc))
        return
    except Exception as exc:  # a library's fault while loading: one line, as the CLI says it
        logging.getLogger("tablefree.serve").exception("loading the model failed")
        conn.send(("error", TableFreeError(f"loading the model failed: {summary(exc, typed=True)}")))
        return
    configure_logging(spec.log_level)
    side.engine = engine
    settle_heap()  # the model is loaded: no full collection walks it again
    engine.start()
    conn.send(("ready", facts))
    side.serve()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # the parent was killed: nobody is left to serve


class _EngineSide:
    """The engine process's end of the pipe: sequences in, each step's events out."""

    def __init__(self, conn):
        self.conn = conn
        self.engine = None
        self.lock = threading.Lock()  # the engine's worker thread and this process's main thread both send
        self.sequences: dict[int, Sequence] = {}  # id -> sequence, until its last event
        self.ids: dict[Sequence, int] = {}
        self.received = 0

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if message[0] == "stop":
                break
            try:
                if message[0] == "submit":
                    self.submit(message[1])
                elif message[0] == "cancel":
                    for sid in message[1]:
                        seq = self.sequences.get(sid)
                        if seq is not None:
                            seq.cancel()
            except Exception:  # a bug here must not take the other requests down
                log.exception("the engine process could not handle a %r message", message[0])
        self.engine.stop()  # ends every sequence left ("the server stopped"), delivered before the pipe closes
        self.conn.close()

    def submit(self, plain: list) -> None:
        tokenizer = self.engine.tokenizer
        sequences = []
        for sid, prompt_ids, params, eos_ids, choice in plain:
            seq = Sequence(prompt_ids, params, tokenizer, None, eos_ids, choice=choice)
            self.sequences[sid], self.ids[seq] = seq, sid
            sequences.append(seq)
        try:
            self.engine.submit(sequences)
        except (QueueFull, ValueError) as exc:
            finish = "abort" if isinstance(exc, QueueFull) else "error"
            self.deliver([(seq, SequenceEvent("", [], finish_reason=finish, error=str(exc))) for seq in sequences])
        self.received += len(sequences)

    def deliver(self, outbox: list[tuple[Sequence, SequenceEvent]]) -> None:
        """One phase's events in one message, with the queue's and the batch's sizes (the server's metrics)."""
        events = []
        for seq, event in outbox:
            sid = self.ids.get(seq)
            if event.finish_reason:
                self.ids.pop(seq, None)
                self.sequences.pop(sid, None)
            events.append((sid, event))
        engine = self.engine
        counts = ((self.received, engine.waiting, engine.running, *engine.draft_counts) if engine is not None
                  else (0,) * 5)
        with self.lock:
            try:
                self.conn.send(("events", events, counts))
            except OSError:  # the parent is gone; the main thread notices and stops
                pass
