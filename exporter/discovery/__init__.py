"""What to probe: targets from configuration and from the Kubernetes API (`watch`: the
live discovery; `targets`: records to targets), and how CoreDNS is reached (`modes`)."""
