"""Prometheus metrics with vLLM's names under the `gemma4:` prefix (dashboards need a prefix change only).

One registry per app (tests build several apps in one process). Gauges read the scheduler at
scrape time; counters and histograms are fed by the request handlers. Every series carries
`model_name`, as vLLM's do.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the route
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, model_name: str, scheduler=None):
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        p = "gemma4:"
        self.running = Gauge(p + "num_requests_running", "Requests holding a KV slot.", m, registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for a slot.", m, registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache token capacity in use (0-1).", m,
                              registry=r)
        self.slots = Gauge(p + "num_slots_in_use", "KV slots held by requests.", m, registry=r)
        # Every started request ends as exactly one of success, aborted or failed, so at rest
        # started = success + aborted + failed (+ running + waiting meanwhile); rejected ones never start.
        self.started = Counter(p + "num_requests_started", "Requests the engine accepted (queued or running).", m,
                               registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", m, registry=r)
        self.success = Counter(p + "request_success", "Finished requests by reason.", m + ["finished_reason"],
                               registry=r)
        self.aborted = Counter(p + "num_aborted_requests", "Requests cancelled (client gone) before finishing.", m,
                               registry=r)
        self.rejected = Counter(p + "num_rejected_requests", "Requests refused because the queue was full.", m,
                                registry=r)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      m, registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens whose K/V the prefix cache supplied.", m,
                                   registry=r)
        self._prefix_seen = (0, 0)  # the engine's totals at the last scrape (the counters follow them)
        self.prefix_hit_rate = Gauge(p + "prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries.", m,
                                     registry=r)
        # Speculative decoding (vLLM's spec_decode series; zero without a drafter), following the engine's totals.
        self.spec_drafts = Counter(p + "spec_decode_num_drafts", "Verify steps of a request with drafted tokens.", m,
                                   registry=r)
        self.spec_draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Drafted tokens.", m, registry=r)
        self.spec_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Drafted tokens accepted.", m,
                                            registry=r)
        self.spec_accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                             "Drafts whose token at this position was accepted.", m + ["position"],
                                             registry=r)
        self.spec_acceptance = Gauge(p + "spec_decode_acceptance_rate",
                                     "spec_decode_num_accepted_tokens / spec_decode_num_draft_tokens.", m, registry=r)
        self.spec_mean_length = Gauge(p + "spec_decode_mean_accepted_length",
                                      "Tokens per drafting step: 1 + accepted tokens / drafts.", m, registry=r)
        self._spec_seen = (0, 0, 0, ())
        self.errors = Counter(p + "num_failed_requests", "Requests that failed in the engine.", m, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.", m, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between tokens.", m, buckets=_LATENCY,
                             registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency.", m, buckets=_LATENCY, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time waiting for a slot.", m,
                                    buckets=_LATENCY, registry=r)
        self.model_name = model_name
        self.scheduler = scheduler

    def label(self, metric):
        return metric.labels(model_name=self.model_name)

    def render(self) -> bytes:
        if self.scheduler is not None:
            s = self.scheduler.stats()
            self.label(self.running).set(s.running)
            self.label(self.waiting).set(s.waiting)
            self.label(self.slots).set(s.slots_in_use)
            self.label(self.kv_usage).set(s.kv_tokens / max(s.kv_capacity, 1))
            queries, hits = self._prefix_seen
            self.label(self.prefix_queries).inc(s.prefix_queries - queries)
            self.label(self.prefix_hits).inc(s.prefix_hits - hits)
            self._prefix_seen = (s.prefix_queries, s.prefix_hits)
            self.label(self.prefix_hit_rate).set(s.prefix_hits / max(s.prefix_queries, 1))
            self._spec(s)
        return generate_latest(self.registry)

    def _spec(self, s) -> None:
        drafts, drafted, accepted, per_pos = self._spec_seen
        self.label(self.spec_drafts).inc(s.spec_drafts - drafts)
        self.label(self.spec_draft_tokens).inc(s.spec_draft_tokens - drafted)
        self.label(self.spec_accepted_tokens).inc(s.spec_accepted_tokens - accepted)
        for i, n in enumerate(s.spec_accepted_per_pos):
            seen = per_pos[i] if i < len(per_pos) else 0
            self.spec_accepted_per_pos.labels(model_name=self.model_name, position=str(i)).inc(n - seen)
        self._spec_seen = (s.spec_drafts, s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_accepted_per_pos)
        self.label(self.spec_acceptance).set(s.spec_accepted_tokens / max(s.spec_draft_tokens, 1))
        self.label(self.spec_mean_length).set(1 + s.spec_accepted_tokens / s.spec_drafts if s.spec_drafts else 0)

    def finished(self, handle, reason: str, token_times: list[float]) -> None:
        """Record one request's outcome and latencies (times are time.monotonic())."""
        if reason == "abort":
            self.label(self.aborted).inc()
        elif reason == "error":
            self.label(self.errors).inc()
        else:
            self.success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.label(self.prompt_tokens).inc(len(handle.request.prompt) if handle.admitted else 0)
        self.label(self.generation_tokens).inc(len(token_times))
        if handle.admitted is not None:
            self.label(self.queue_time).observe(handle.admitted - handle.submitted)
        if token_times:
            self.label(self.ttft).observe(token_times[0] - handle.submitted)
            for a, b in zip(token_times, token_times[1:]):
                self.label(self.itl).observe(b - a)
            self.label(self.e2e).observe(token_times[-1] - handle.submitted)
