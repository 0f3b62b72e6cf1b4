"""Restarting sick CoreDNS pods: the Alertmanager payload (`alerts`), the guard rails as
pure functions (`guards`), the shared state in a Lease (`lease`), and the acts
(`remediator`)."""
