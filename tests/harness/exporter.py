"""The exporter under test as a real process: `serve` started, awaited and stopped by PID."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .netns import NetNS


class Exporter:
    """A running `coredns-health-exporter serve`, logging JSON lines to stderr."""

    def __init__(
        self,
        args: Sequence[str],
        netns: NetNS | None = None,
        timeout: float = 30,
    ):
        """In a namespace, `url` reaches the exporter through a relay (NetNS.expose)."""
        command = [sys.executable, "-m", "exporter", "serve", "--log-format", "json", *args]
        if not any(a.startswith("--listen") for a in args):
            command += ["--listen", "127.0.0.1:0"]
        if netns is not None:
            command = netns.command(command)
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self._await_listening(timeout)
        if netns is not None:
            self.address = netns.expose(self.address)
        self.url = f"http://{self.address}"

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = {"msg": line.rstrip("\n"), "level": "raw"}
            self.logs.append(record)
            self._lines.put(record)
        self._lines.put(None)

    def _await_listening(self, timeout: float) -> str:
        while True:
            try:
                record = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    "exporter did not start listening:\n" + "".join(self.raw)
                ) from None
            if record is None:
                self.process.wait(timeout=10)
                raise RuntimeError(
                    f"exporter exited with {self.process.returncode}:\n" + "".join(self.raw)
                )
            if record.get("msg") == "listening":
                return str(record["addresses"][0])

    def logs_until(self, done: Callable[[list[dict[str, Any]]], bool],
                   timeout: float = 10) -> list[dict[str, Any]]:
        """The log so far, once `done(log)` holds (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = list(self.logs)
            if done(logs) or time.monotonic() > deadline or self.process.poll() is not None:
                return logs
            time.sleep(0.02)  # polling the reader thread's list

    def logged(self, msg: str, timeout: float = 10) -> list[dict[str, Any]]:
        """The log records with this message, once there is at least one (the log is read
        by a thread: a line written before an HTTP answer may arrive just after it)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in list(self.logs) if r.get("msg") == msg]
            if found or time.monotonic() > deadline or self.process.poll() is not None:
                return found
            time.sleep(0.02)  # polling the reader thread's list

    def messages(self) -> list[str]:
        return [str(r.get("msg")) for r in self.logs]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode
