"""Observability: the metric catalogue, the Prometheus endpoint neuranmon serves, health, history, report."""
