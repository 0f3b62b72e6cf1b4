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
# Prometheus 3, promtool, Alertmanager, amtool, the Prometheus Operator and its config
# reloader (scripts/install-monitoring-tools), and the Operator's CRDs beside them.
MONITORING_BIN = CACHE / "monitoring" / "bin"
OPERATOR_CRDS = CACHE / "monitoring" / "crds"
# Upstream's example manifests of the same Operator release (its RBAC and Deployment).
OPERATOR_EXAMPLES = CACHE / "monitoring" / "rbac"


MONITORING_TOOLS = ("prometheus", "promtool", "alertmanager", "operator",
                    "prometheus-config-reloader")


def monitoring_missing(*names: str) -> str | None:
    """None when the monitoring components `names` (default: all, and the Operator's
    manifests) are built, else which one is not and how to build it."""
    for name in names or MONITORING_TOOLS:
        if not (MONITORING_BIN / name).is_file():
            return f"{MONITORING_BIN / name} not built: run scripts/install-monitoring-tools"
    for directory in (() if names else (OPERATOR_CRDS, OPERATOR_EXAMPLES)):
        if not directory.is_dir():
            return f"{directory} missing: run scripts/install-monitoring-tools"
    return None


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
