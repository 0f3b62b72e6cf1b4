"""coredns-health-exporter: probes CoreDNS the way clients use it and exports what it sees."""

__version__ = "0.1.0"
