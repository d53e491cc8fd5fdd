"""`quickdraft bench soak`: many sessions for a long time; is memory flat, does anything fail?

The load is the load benchmark's (trajectories replayed by concurrent sessions, new
sessions as trajectories end, speculation on). Meanwhile the proxy's ``/metrics`` is
sampled at a fixed interval for its own resident memory and, per worker, resident
memory, KV-cache memory and sessions held. Memory is called flat when, after the
first quarter of the run (warm-up), the median of the last quarter exceeds the median
of the second quarter by at most 5 % (or 64 MB for small processes). A worker's KV
caches are meant to grow until they reach their configured budget, which can take
longer than a quarter of the run, so the worker's verdict is on its memory *besides*
the KV caches (resident memory minus KV bytes: weights, activations, allocator,
bookkeeping), and the KV caches are reported on their own (their peak is bounded by
``kv_budget_mb`` plus the sessions active in the last ``kv_active_s``).
"""

from __future__ import annotations

import asyncio
import pathlib
import ssl
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from quickdraft.bench.load import _run_mode, _summary, conversations
from quickdraft.proto.tls import SYSTEM, TlsConfig

FLAT_FRACTION = 0.05
FLAT_FLOOR_BYTES = 64 * 2**20
WORKER_SERIES = {"quickdraft_worker_resident_memory_bytes": "rss", "quickdraft_worker_kv_cache_bytes": "kv",
                 "quickdraft_worker_sessions": "sessions"}


@dataclass(slots=True)
class Sample:
    t_s: float
    proxy_rss: float
    in_flight: float
    workers: dict[str, dict[str, float]] = field(default_factory=dict)  # address -> rss, kv, sessions


def _scrape(text: str, elapsed: float) -> Sample:
    sample = Sample(round(elapsed, 1), 0.0, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "process_resident_memory_bytes":
                sample.proxy_rss = s.value
            elif s.name == "quickdraft_requests_in_flight":
                sample.in_flight = s.value
            elif s.name in WORKER_SERIES:
                sample.workers.setdefault(s.labels["worker"], {})[WORKER_SERIES[s.name]] = s.value
    return sample


def flatness(values: list[float]) -> dict:
    """Growth between the second and the last quarter of a series (the first quarter is warm-up)."""
    n = len(values)
    if n < 8:
        return {"samples": n, "flat": None}
    second = statistics.median(values[n // 4 : n // 2])
    last = statistics.median(values[3 * n // 4 :])
    growth = last - second
    allowed = max(FLAT_FRACTION * second, FLAT_FLOOR_BYTES)
    return {"samples": n, "first_mb": round(values[0] / 2**20, 1), "max_mb": round(max(values) / 2**20, 1),
            "second_quarter_median_mb": round(second / 2**20, 1), "last_quarter_median_mb": round(last / 2**20, 1),
            "growth_mb": round(growth / 2**20, 1), "flat": growth <= allowed}


def _https_context(tls: TlsConfig | None) -> ssl.SSLContext | bool:
    """How the metrics endpoint's certificate is checked: by the roots the TLS settings name, presenting
    their certificate (the proxy's HTTPS port asks the same callers as its gRPC port)."""
    if tls is None or not tls.calls_securely:
        return True
    context = ssl.create_default_context(cafile=None if tls.ca_file == SYSTEM else tls.ca_file)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


async def _sample(url: str, started: float, every_s: float, out: list[Sample], stop: asyncio.Event,
                  report, tls: TlsConfig | None = None) -> None:
    async with httpx.AsyncClient(timeout=10, verify=_https_context(tls)) as http:
        while not stop.is_set():
            try:
                reply = await http.get(url)
                sample = _scrape(reply.text, time.perf_counter() - started)
                out.append(sample)
                report(sample)
            except httpx.HTTPError as exc:
                report(None, f"metrics unreachable: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=every_s)
            except TimeoutError:
                pass


async def _soak(proxy: str, metrics_url: str, convs: list, sessions: int, duration_s: float, sample_s: float,
                max_new_tokens: int, report, tls: TlsConfig | None = None) -> tuple[dict, list[Sample]]:
    samples: list[Sample] = []
    stop = asyncio.Event()
    started = time.perf_counter()
    sampler = asyncio.create_task(_sample(metrics_url, started, sample_s, samples, stop, report, tls))
    run = await _run_mode(proxy, convs, sessions, duration_s, True, max_new_tokens, f"soak-{int(time.time())}",
                          tls)
    stop.set()
    await sampler
    return _summary(run), samples


def run_soak(paths: Sequence[str | pathlib.Path], proxy: str, metrics_url: str, sessions: int = 64,
             duration_s: float = 600.0, sample_s: float = 10.0, max_new_tokens: int = 64,
             max_message_chars: int = 1500, context_cap: int = 2048, tokenizer: str = "smollm2-135m",
             progress: bool = True, tls: TlsConfig | None = None) -> dict:
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    convs = conversations(paths, tokenizer, max_message_chars, context_cap)

    def report(sample: Sample | None, problem: str = "") -> None:
        if sample is None:
            console.print(f"[yellow]{problem}[/]")
            return
        workers = ", ".join(f"{a}: {w.get('rss', 0) / 2**20:.0f} MB (KV {w.get('kv', 0) / 2**20:.0f} MB, "
                            f"{w.get('sessions', 0):.0f} sessions)" for a, w in sample.workers.items())
        console.print(f"{sample.t_s:6.0f} s  proxy {sample.proxy_rss / 2**20:.0f} MB, {sample.in_flight:.0f} in "
                      f"flight; {workers}")

    console.print(f"soak: {sessions} sessions for {duration_s:g} s against {proxy}; memory from {metrics_url}")
    summary, samples = asyncio.run(_soak(proxy, metrics_url, convs, sessions, duration_s, sample_s,
                                         max_new_tokens, report, tls))
    memory = {"proxy": flatness([s.proxy_rss for s in samples])}
    for address in sorted({a for s in samples for a in s.workers}):
        seen = [s.workers[address] for s in samples if address in s.workers]
        memory[f"worker {address} besides KV"] = flatness([w.get("rss", 0.0) - w.get("kv", 0.0) for w in seen])
        memory[f"worker {address} resident"] = {**flatness([w.get("rss", 0.0) for w in seen]), "verdict": False}
        memory[f"worker {address} KV caches"] = {**flatness([w.get("kv", 0.0) for w in seen]), "verdict": False}
    verdicts = [m["flat"] for m in memory.values() if m["flat"] is not None and m.get("verdict", True)]
    return {
        "benchmark": "soak", "proxy": proxy, "sessions": sessions, "duration_s": duration_s,
        "max_new_tokens": max_new_tokens, "max_message_chars": max_message_chars, "context_cap": context_cap,
        **summary, "memory": memory, "memory_flat": bool(verdicts) and all(verdicts),
        "samples": [asdict(s) for s in samples],
    }
