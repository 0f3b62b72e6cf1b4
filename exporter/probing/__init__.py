"""Probe rounds (`scheduler`) and the transports they run over: directly, the API
server's port-forward (`portforward`), a short-lived probe pod (`probepod`)."""
