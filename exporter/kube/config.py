"""Which Kubernetes credentials are used: a named kubeconfig, the in-cluster service
account, then $KUBECONFIG or ~/.kube/config.
"""

from __future__ import annotations

import os
from pathlib import Path

# Where a pod finds its service-account credentials.
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")



class KubeConfigError(Exception):
    """A Kubernetes configuration was named but cannot be used."""


def find_config(kubeconfig: str | None) -> str | None:
    """Describe the Kubernetes config that would be used, or None when there is none.

    Order: `--kubeconfig`, then in-cluster credentials, then `$KUBECONFIG`, then
    `~/.kube/config`, as DESIGN.md says.
    """
    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise KubeConfigError(f"--kubeconfig {kubeconfig}: no such file")
        return kubeconfig
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.is_file():
        return IN_CLUSTER
    for candidate in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if candidate and Path(candidate).is_file():
            return candidate
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


IN_CLUSTER = "in-cluster service account"


