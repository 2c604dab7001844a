"""Prometheus metrics of one API process, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mailpipe_http_requests",
            "HTTP requests answered, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mailpipe_http_request_seconds",
            "Time to answer an HTTP request",
            ["route"],
            registry=self.registry,
        )
        self.accepted = Counter(
            "mailpipe_emails_accepted", "Emails committed by the API", registry=self.registry
        )
        self.ratelimit_fallback = Counter(
            "mailpipe_ratelimit_fallback_decisions",
            "Rate-limit decisions taken by the per-process fallback (Redis down or slow),"
            " by outcome (allowed, limited)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("allowed", "limited"):
            self.ratelimit_fallback.labels(outcome)  # exported as 0 from the start

    def render(self) -> bytes:
        return generate_latest(self.registry)
