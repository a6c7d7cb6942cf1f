"""A real `tablefree serve` process on a free loopback port, for the serving tests."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CARD_CONTEXT = 1024  # the model card's curl asks for 512 new tokens: the test model's context must hold them


def serving_model(tmp_path_factory) -> Path:
    """A tiny table-free model (random weights, code-point tokenizer with chat template), built once per session."""
    path = tmp_path_factory.getbasetemp() / "serve-model"
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "tablefree.cli", "new", "tiny-affine", str(path),
                        f"max_position_embeddings={CARD_CONTEXT}"], check=True, capture_output=True)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, log_path: Path, *args: str, env: dict | None = None, open_files: int | None = None,
                 new_session: bool = False):
        """`open_files`: the child's RLIMIT_NOFILE (soft and hard), to reach the limit with a few hundred sockets.
        `new_session`: the server leads a process group of its own, which a test may signal as a terminal would."""
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}

        def child_setup() -> None:
            # Ctrl-C reaches the server as from a terminal even where the tests run with SIGINT ignored (a background
            # job inherits that, and uvicorn then re-raises a handled SIGINT into the ignore: exit 0, not 130).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if open_files is not None:  # the child's RLIMIT_NOFILE
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tablefree.cli", "serve", str(model), "--port", str(self.port), "--host", "127.0.0.1",
             "--log-level", "warning", "--threads", "1", *args],  # one thread: test machines are shared
            stdout=self.log, stderr=subprocess.STDOUT, env=env, preexec_fn=child_setup, start_new_session=new_session,
        )
        self.wait_ready()

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")

    def engine_pid(self) -> int | None:
        """The pid of the server's engine process (`--engine process`), or None when it runs none."""
        import psutil

        children = [c for c in psutil.Process(self.process.pid).children() if "spawn_main" in " ".join(c.cmdline())]
        return children[0].pid if children else None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
