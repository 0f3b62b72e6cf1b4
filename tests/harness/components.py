"""Finding the real components, and what to do when one is missing.

Outside CI a missing component skips its tests with the reason and the command that
installs it; with CI=true it fails them, so a green CI cannot hide an untested component.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CACHE = Path(
    os.environ.get("COREDNS_HEALTH_EXPORTER_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coredns-health-exporter"
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(component: str, how: str) -> None:
    """Skip (or, in CI, fail) the calling test because `component` is not available."""
    message = f"{component} is not available: {how}"
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def coredns_binary() -> Path | None:
    cached = CACHE / "bin" / "coredns"
    if cached.is_file():
        return cached
    found = shutil.which("coredns")
    return Path(found) if found else None


def can_use_netns() -> str | None:
    """None if network namespaces with iptables can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/install-test-tools installs it)"
    return None


def stop_process(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    """End a process this suite started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
