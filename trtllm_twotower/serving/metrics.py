"""Prometheus metrics of the OpenAI-compatible server (``GET /metrics``, text format 0.0.4).

Per request: its outcome, prompt (prefill) and generated tokens, time to its first block, the gaps
between its blocks, generated tokens per forward, speculative drafts accepted; sampled at scrape
time: the scheduler's running and waiting rows and queued requests. One registry per app, so two
apps in a process do not share figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("ok", "cancelled", "bad_request", "unauthorized", "too_large", "rejected", "unavailable", "error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_STEP_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)


def outcome_of_status(status: int) -> str:
    return {401: "unauthorized", 413: "too_large", 429: "rejected", 503: "unavailable"}.get(
        status, "bad_request" if status < 500 else "error")


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("twotower_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("twotower_prompt_tokens", "Prompt tokens prefilled (each row's prompt)",
                                     registry=r)
        self.generated_tokens = Counter("twotower_generated_tokens", "Tokens generated", registry=r)
        self.first_block = Histogram("twotower_time_to_first_block_seconds",
                                     "From submission to the request's first committed tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.block_gap = Histogram("twotower_block_latency_seconds",
                                   "Between two committed blocks of a streamed row (tokens in AR / mock-AR)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("twotower_tokens_per_step", "Generated tokens per forward, per request",
                                         ["mode"], buckets=TOKENS_PER_STEP_BUCKETS, registry=r)
        self.spec_blocks = Counter("twotower_speculative_blocks", "Speculative blocks verified", registry=r)
        self.spec_accepted = Counter("twotower_speculative_accepted_drafts",
                                     "Drafted tokens accepted by the verification", registry=r)
        Gauge("twotower_rows_running", "Rows in the running batch", registry=r).set_function(lambda: scheduler.running)
        Gauge("twotower_rows_waiting", "Rows waiting for admission", registry=r).set_function(
            lambda: scheduler.waiting)
        Gauge("twotower_requests_queued", "Requests with rows waiting for admission", registry=r).set_function(
            lambda: scheduler.queued_requests)
        for endpoint in ("completions", "chat"):  # every series present from the start
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def finished(self, mode: str, ticket, result) -> None:
        """A request's figures once it is done (``result``: its GenerationResult)."""
        self.prompt_tokens.inc(sum(len(r.prompt) for r in ticket.rows))
        self.generated_tokens.inc(sum(map(len, result.output_ids)))
        if ticket.first_tokens is not None:
            self.first_block.observe(ticket.first_tokens - ticket.submitted)
        self.tokens_per_step.labels(mode).observe(result.tokens_per_step)
        accepted = [a for r in ticket.rows for a in r.out.accepted]
        if accepted:
            self.spec_blocks.inc(len(accepted))
            self.spec_accepted.inc(sum(accepted))

    def render(self) -> bytes:
        return generate_latest(self.registry)
