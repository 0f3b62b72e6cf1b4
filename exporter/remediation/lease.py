"""The shared state of remediation in a coordination.k8s.io Lease: the last restart (the
cooldown) and the episodes acted on, read and written as annotations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .alerts import parse_time
from .guards import LeaseState

LEASE_NAME = "coredns-health-exporter-remediation"
ANNOTATION = "coredns-health-exporter.io/"
# Episodes older than this are forgotten (a new firing has a new startsAt anyway).
EPISODE_MEMORY = timedelta(days=7)
MAX_EPISODES = 500


def micro(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_state(obj: Mapping[str, Any] | None) -> LeaseState:
    if not obj:
        return LeaseState()
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    last = parse_time(notes.get(ANNOTATION + "last-restart", ""))
    episodes: dict[str, datetime] = {}
    try:
        raw = json.loads(notes.get(ANNOTATION + "episodes", "{}"))
        for key, value in (raw.items() if isinstance(raw, dict) else []):
            when = parse_time(value) if isinstance(value, str) else None
            if when:
                episodes[str(key)] = when
    except ValueError:
        pass  # unreadable state: start afresh, the cooldown still holds
    return LeaseState(last, episodes)


def lease_body(
    obj: Mapping[str, Any] | None, state: LeaseState, namespace: str, holder: str, now: datetime
) -> dict[str, Any]:
    keep = sorted(
        ((k, v) for k, v in state.episodes.items() if now - v < EPISODE_MEMORY),
        key=lambda kv: kv[1],
    )[-MAX_EPISODES:]
    notes = {ANNOTATION + "episodes": json.dumps({k: micro(v) for k, v in keep})}
    if state.last_restart is not None:
        notes[ANNOTATION + "last-restart"] = micro(state.last_restart)
    meta = dict((obj or {}).get("metadata") or {})
    meta.update(name=LEASE_NAME, namespace=namespace,
                annotations={**(meta.get("annotations") or {}), **notes})
    if state.last_restart is None:
        meta["annotations"].pop(ANNOTATION + "last-restart", None)
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
        "spec": {**((obj or {}).get("spec") or {}), "holderIdentity": holder,
                 "renewTime": micro(now)},
    }


