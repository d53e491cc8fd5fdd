"""Prometheus metrics of the proxy, served at ``/metrics`` on the HTTP port.

Each proxy process keeps its own registry (tests start several in one machine),
filled as requests finish; scrape every replica.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from quickdraft.proto import quickdraft_pb2 as pb

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends, for this proxy process
        self.requests = Counter("quickdraft_requests", "Requests finished, by outcome", ["model", "drafter", "outcome"],
                                registry=r)
        self.completion_tokens = Counter("quickdraft_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.steps = Counter("quickdraft_verification_steps", "Verification steps (forward passes)", ["model"],
                             registry=r)
        self.drafted = Counter("quickdraft_drafted_tokens", "Draft tree nodes sent for verification", ["model"],
                               registry=r)
        self.accepted = Counter("quickdraft_accepted_draft_tokens", "Draft tokens accepted", ["model"], registry=r)
        self.fallbacks = Counter("quickdraft_fallbacks", "Requests or spans moved to a larger model", ["model"],
                                 registry=r)
        self.failovers = Counter("quickdraft_worker_failovers", "Sessions moved to another worker mid-request",
                                 registry=r)
        self.ttft = Histogram("quickdraft_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("quickdraft_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("quickdraft_tokens_per_step", "Tokens per verification step, per request",
                                         ["model"], buckets=(1, 1.5, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.in_flight = Gauge("quickdraft_requests_in_flight", "Requests being served (the proxy's queue)",
                               registry=r)
        self.redis_up = Gauge("quickdraft_shared_state_up", "1 when Redis (shared drafting state) is reachable; "
                              "1 too without Redis", registry=r)
        self.redis_up.set(1)
        self.shared_dropped = Gauge("quickdraft_shared_responses_dropped", "Learned responses never written to "
                                    "Redis (its queue overflowed while Redis was unreachable)", registry=r)
        self.shared_skipped = Gauge("quickdraft_shared_entries_skipped", "Entries of the shared response log "
                                    "that were not a replica's response, skipped", registry=r)
        self.records_up = Gauge("quickdraft_records_up", "1 when the SQL request records are being written "
                                "(1 too when they are off)", registry=r)
        self.records_queued = Gauge("quickdraft_records_queued", "Request records waiting for the database",
                                    registry=r)
        self.records_dropped = Gauge("quickdraft_records_dropped", "Request records dropped because the database "
                                     "was unreachable for too long", registry=r)
        self.records_up.set(1)
        self.worker_up = Gauge("quickdraft_worker_up", "1 when the worker answers its health checks",
                               ["worker", "model"], registry=r)
        self.worker_queue = Gauge("quickdraft_worker_queue_depth", "Verification steps waiting at the worker "
                                  "(as of its last pass)", ["worker"], registry=r)
        self.worker_batch = Gauge("quickdraft_worker_batch_size", "Sessions in the worker's last forward pass",
                                  ["worker"], registry=r)
        self.worker_rss = Gauge("quickdraft_worker_resident_memory_bytes", "Resident memory of the worker process",
                                ["worker"], registry=r)
        self.worker_kv = Gauge("quickdraft_worker_kv_cache_bytes", "Memory of the worker's session KV caches",
                               ["worker"], registry=r)
        self.worker_sessions = Gauge("quickdraft_worker_sessions", "Sessions whose KV cache the worker holds",
                                     ["worker"], registry=r)
        self.drafting_state = Gauge("quickdraft_drafting_state_bytes", "Memory of what each drafter has learned "
                                    "(tenant indexes and tables, session indexes), read at each scrape",
                                    ["drafter"], registry=r)
        self.worker_in_flight = Gauge("quickdraft_worker_in_flight", "Steps this proxy has sent to the worker and "
                                      "awaits", ["worker"], registry=r)

    def finished(self, usage: pb.Usage, completion_tokens: int) -> None:
        model = usage.route or "unknown"
        self.requests.labels(model, usage.drafter, "ok").inc()
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.steps.labels(model).inc(usage.verification_steps)
        self.drafted.labels(model).inc(usage.drafted_tokens)
        self.accepted.labels(model).inc(usage.accepted_draft_tokens)
        self.fallbacks.labels(model).inc(usage.fallbacks)
        self.failovers.inc(usage.worker_failovers)
        self.ttft.labels(model).observe(usage.time_to_first_token_ms / 1e3)
        if completion_tokens > 1:
            self.tpot.labels(model).observe(
                max(usage.total_ms - usage.time_to_first_token_ms, 0.0) / 1e3 / (completion_tokens - 1))
        if usage.verification_steps:
            self.tokens_per_step.labels(model).observe(completion_tokens / usage.verification_steps)

    def failed(self, model: str, outcome: str) -> None:
        self.requests.labels(model or "unknown", "", outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
