"""The webhook's bearer token: read from its file (re-read when the file changes: a
rotated Secret), compared in constant time.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FileStamp = tuple[int, int, int]


def file_stamp(path: Path) -> FileStamp | None:
    """What changes when a file is rewritten or replaced (a rotated Secret swaps the
    symlinks of its volume; stat follows them): inode, mtime and size. None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class TokenFile:
    """The bearer token, re-read whenever its file changes (a rotated Secret)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._stamp: FileStamp | None = None
        self._token: str | None = None
        self._problem: str | None = None
        self._told: str | None = None

    def current(self) -> str | None:
        """The token, or None (then `problem` says why) when there is none to check."""
        if self.path is None:
            self._problem = "no --webhook-token-file configured: the webhook is disabled"
            return None
        stamp = file_stamp(self.path)
        if stamp is None or stamp != self._stamp:
            try:
                token = self.path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                self._stamp, self._token = None, None
                self._problem = f"cannot read {self.path}: {exc.strerror}"
                return None
            self._stamp, self._token = stamp, token or None
            self._problem = None if token else f"{self.path} is empty"
        return self._token

    @property
    def problem(self) -> str | None:
        return self._problem

    def tell_once(self) -> None:
        """Log why the webhook answers 503, once per reason."""
        if self._problem and self._problem != self._told:
            self._told = self._problem
            log.warning("webhook answering 503", extra={"fields": {"reason": self._problem}})


def authorized(header: str, token: str) -> bool:
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())



def authorized_basic(header: str) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic` header, else None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode(
            "utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None
