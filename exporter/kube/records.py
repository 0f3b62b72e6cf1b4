"""API objects (plain JSON) turned into the project's small frozen records, so that no
other module sees the client's models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..model import NodeInfo, PodInfo, Protocol, ServiceInfo

# -- API objects -> records -------------------------------------------------------------


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def service_info(obj: Mapping[str, Any]) -> ServiceInfo:
    """A Service (JSON) as a record: its ClusterIPs, DNS port and selector.

    ClusterIPs come from `spec.clusterIPs` (dual-stack), else `spec.clusterIP`; a headless
    Service ("None") has none. The DNS port is the UDP port named `dns`, else any UDP
    port, else the TCP port named `dns-tcp`, else port 53 if listed.
    """
    meta, spec = _dict(obj.get("metadata")), _dict(obj.get("spec"))
    ips = [_str(ip) for ip in _list(spec.get("clusterIPs"))] or [_str(spec.get("clusterIP"))]
    ips = [ip for ip in ips if ip and ip != "None"]
    ports = [_dict(p) for p in _list(spec.get("ports"))]

    def pick(proto: str, name: str | None) -> Mapping[str, Any] | None:
        for p in ports:
            if ((p.get("protocol") or "TCP") == proto and (name is None or p.get("name") == name)
                    and isinstance(p.get("port"), int)):
                return p
        return None

    chosen = (pick("UDP", "dns") or pick("UDP", None) or pick("TCP", "dns-tcp")
              or next((p for p in ports if p.get("port") == 53), None))
    port = chosen["port"] if chosen else None
    # targetPort defaults to the port (the API server fills it in); a name is the pods'.
    target = chosen.get("targetPort", port) if chosen else None
    target_port = target if isinstance(target, int | str) and target != "" else port
    selector = {str(k): _str(v) for k, v in _dict(spec.get("selector")).items()}
    ingress = [_str(_dict(i).get("ip"))
               for i in _list(_dict(_dict(obj.get("status")).get("loadBalancer")).get("ingress"))]
    return ServiceInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        cluster_ips=tuple(ips),
        port=port,
        selector=tuple(sorted(selector.items())),
        type=_str(spec.get("type")) or "ClusterIP",
        dns_ports=dns_ports(ports),
        ingress=tuple(ip for ip in ingress if ip),
        target_port=target_port,
    )


def dns_ports(ports: Sequence[Mapping[str, Any]]) -> tuple[tuple[Protocol, int, int], ...]:
    """A Service's DNS ports as (protocol, port, nodePort or 0): UDP and TCP ports that are
    named `dns`/`dns-tcp`, or whose port or targetPort is 53 or is named so."""
    found: list[tuple[Protocol, int, int]] = []
    for p in ports:
        protocol, port, target = (p.get("protocol") or "TCP"), p.get("port"), p.get("targetPort")
        if protocol not in ("UDP", "TCP") or not isinstance(port, int):
            continue
        named = {p.get("name"), target} & {"dns", "dns-tcp"}
        if named or 53 in (port, target):
            node_port = p.get("nodePort")
            found.append((Protocol(protocol.lower()), port,
                          node_port if isinstance(node_port, int) else 0))
    return tuple(found)


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    """A Node (JSON) as a record: its name and status.addresses."""
    addresses = [_dict(a) for a in _list(_dict(obj.get("status")).get("addresses"))]
    return NodeInfo(
        name=_str(_dict(obj.get("metadata")).get("name")),
        addresses=tuple((_str(a.get("type")), _str(a.get("address"))) for a in addresses),
    )


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """A Pod (JSON) as a record: its IPs (dual-stack), node, Ready condition, phase."""
    meta, spec, status = (_dict(obj.get(k)) for k in ("metadata", "spec", "status"))
    ips = [_str(_dict(p).get("ip")) for p in _list(status.get("podIPs"))]
    ips = [ip for ip in ips if ip] or ([_str(status["podIP"])] if status.get("podIP") else [])
    ready = any(
        _dict(c).get("type") == "Ready" and _dict(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )
    return PodInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        uid=_str(meta.get("uid")),
        ips=tuple(ips),
        node=_str(spec.get("nodeName")),
        ready=ready,
        phase=_str(status.get("phase")),
        labels=tuple(sorted((str(k), _str(v)) for k, v in _dict(meta.get("labels")).items())),
        deleting=bool(meta.get("deletionTimestamp")),
        created=_str(meta.get("creationTimestamp")),
        state=_container_state(_list(status.get("containerStatuses"))),
        ports=tuple(
            (_str(p.get("name")), _str(p.get("protocol")) or "TCP", p["containerPort"])
            for c in _list(spec.get("containers")) for p in map(_dict, _list(_dict(c).get("ports")))
            if p.get("name") and isinstance(p.get("containerPort"), int)),
    )


def _container_state(statuses: list[Any]) -> str:
    state = _dict(_dict(statuses[0]).get("state")) if statuses else {}
    for kind, value in state.items():
        detail = _dict(value)
        if kind == "terminated":
            return (f"terminated: exit code {detail.get('exitCode')} "
                    f"({_str(detail.get('reason'))}) {_str(detail.get('message'))}").strip()
        parts = [kind, _str(detail.get("reason")), _str(detail.get("message"))]
        return ": ".join(p for p in parts if p)
    return ""


def label_selector(selector: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in selector)



