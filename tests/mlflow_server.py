"""Tracking servers for tests, on loopback only: a real ``mlflow server`` that can be stopped and
started again on the same store and port, and a server that accepts connections and never
answers (a hung proxy, a wedged tracking host)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store under ``root``."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = Path(root), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 300) -> "MlflowServer":
        if self.running:  # a second server would be lost to stop(), and outlive the tests
            raise RuntimeError(f"mlflow server on port {self.port} is already running")
        log = open(self.root / "server.log", "a")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout  # a loaded machine takes minutes: a guard, not a timing test
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (self.root / "server.log").read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        """Kill the server (uvicorn runs in a child process: the whole group goes)."""
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=30)
        self._process = None

    def __enter__(self) -> "MlflowServer":
        # `with server.start():` and `with server:` both mean one server, stopped on exit
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SilentServer:
    """Accepts TCP connections on loopback and never sends a byte."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.uri = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                connection, _ = self._sock.accept()
                self._held.append(connection)  # keep it open, say nothing
            except OSError:
                continue

    @property
    def connections(self) -> int:
        return len(self._held)

    def __enter__(self) -> "SilentServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self._held:
            connection.close()
        self._sock.close()
