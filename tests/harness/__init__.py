"""Starts the real components the tests talk to: CoreDNS processes and network namespaces."""
