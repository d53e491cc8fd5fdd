"""`quickdraft bench load`: many agent sessions at once against a running stack.

Each concurrent session replays one trajectory's calls in order over gRPC (its
own session id, so KV reuse works as for a real agent), then takes the next
trajectory, until the level's time is up; requests already sent are finished.
Every level runs twice, speculation on and then off, over the same calls.
Agent prompts are long (median 12,600 tokens), so to keep dozens of sessions
within a CPU worker's reach, each message is cut to ``max_message_chars`` and a
trajectory's calls stop at the first prompt above ``context_cap`` tokens (both
are reported with the figures).
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from quickdraft.bench.traces import all_calls
from quickdraft.catalog import chat_prompt_ids, load_tokenizer
from quickdraft.client import AsyncQuickDraftClient
from quickdraft.proto.tls import TlsConfig


@dataclass(slots=True)
class Request:
    ok: bool
    rejected: bool = False          # RESOURCE_EXHAUSTED: a deliberate limit
    tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float | None = None    # after the first token, per token
    error: str = ""


@dataclass(slots=True)
class ModeRun:
    wall_s: float
    requests: list[Request] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.requests if r.ok) / max(self.wall_s, 1e-9)


def conversations(paths: Sequence[str | pathlib.Path], tokenizer: str, max_chars: int,
                  cap: int) -> list[list[list[dict[str, str]]]]:
    """Per trajectory, the (shortened) messages of each call, up to the first that exceeds ``cap`` tokens."""
    tok = load_tokenizer(tokenizer)
    out: dict[str, list[list[dict[str, str]]]] = {}
    stopped: set[str] = set()
    for call in all_calls(paths):
        if call.trajectory in stopped:
            continue
        messages = [{"role": m["role"], "content": m["content"][:max_chars]} for m in call.messages]
        if len(chat_prompt_ids(tok, messages)) > cap:
            stopped.add(call.trajectory)
            continue
        out.setdefault(call.trajectory, []).append(messages)
    convs = [calls for calls in out.values() if calls]
    if not convs:
        raise SystemExit(f"no call fits a context cap of {cap} tokens")
    return convs


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _session_worker(client: AsyncQuickDraftClient, work: Iterator[tuple[int, list]], deadline: float,
                          speculate: bool, max_new_tokens: int, tag: str, results: list[Request]) -> None:
    while time.perf_counter() < deadline:
        try:
            index, calls = next(work)
        except StopIteration:
            return
        for messages in calls:
            if time.perf_counter() >= deadline:
                return
            try:
                c = await client.generate(messages, max_tokens=max_new_tokens, speculate=speculate,
                                          session_id=f"{tag}/{index}", timeout=600)
            except grpc.aio.AioRpcError as exc:
                rejected = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                results.append(Request(ok=False, rejected=rejected, error=f"{exc.code().name}: {exc.details()}"))
                if rejected:
                    await asyncio.sleep(0.5)
                continue
            n = len(c.token_ids)
            tpot = (c.wall_s - c.ttft_s) * 1e3 / (n - 1) if n > 1 else None
            results.append(Request(ok=True, tokens=n, ttft_ms=c.ttft_s * 1e3, tpot_ms=tpot))


async def _run_mode(proxy: str, convs: list, sessions: int, duration_s: float, speculate: bool,
                    max_new_tokens: int, tag: str, tls: TlsConfig | None = None) -> ModeRun:
    results: list[Request] = []
    work = iter(enumerate(itertools.islice(itertools.cycle(convs), 100_000)))
    started = time.perf_counter()
    async with AsyncQuickDraftClient(proxy, tls=tls) as client:
        await asyncio.gather(*(
            _session_worker(client, work, started + duration_s, speculate, max_new_tokens, tag, results)
            for _ in range(sessions)
        ))
    return ModeRun(time.perf_counter() - started, results)


def _summary(run: ModeRun) -> dict:
    ok = [r for r in run.requests if r.ok]
    ttft = [r.ttft_ms for r in ok]
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    return {
        "tokens_per_s": round(run.tokens_per_s, 2),
        "requests": len(ok),
        "ttft_p50_ms": _percentile(ttft, 0.5), "ttft_p95_ms": _percentile(ttft, 0.95),
        "ttft_p99_ms": _percentile(ttft, 0.99),
        "tpot_p50_ms": _percentile(tpot, 0.5), "tpot_p95_ms": _percentile(tpot, 0.95),
        "tpot_p99_ms": _percentile(tpot, 0.99),
        "failed_requests": sum(1 for r in run.requests if not r.ok and not r.rejected),
        "rejected_requests": sum(1 for r in run.requests if r.rejected),
        "errors": sorted({r.error for r in run.requests if r.error})[:5],
        "wall_s": round(run.wall_s, 1),
    }


def run_load(paths: Sequence[str | pathlib.Path], proxy: str = "127.0.0.1:50051",
             levels: Sequence[int] = (1, 8, 32, 64), duration_s: float = 60.0, max_new_tokens: int = 64,
             max_message_chars: int = 1500, context_cap: int = 2048, tokenizer: str = "smollm2-135m",
             progress: bool = True, tls: TlsConfig | None = None) -> dict:
    from rich.console import Console

    console = Console(stderr=True, quiet=not progress)
    convs = conversations(paths, tokenizer, max_message_chars, context_cap)
    out_levels = []
    run_id = f"load-{int(time.time())}"
    for n in levels:
        modes = {}
        for mode, speculate in (("speculative", True), ("plain", False)):
            console.print(f"load: {n} sessions, {mode}, {duration_s:g} s ...")
            run = asyncio.run(_run_mode(proxy, convs, n, duration_s, speculate, max_new_tokens,
                                        f"{run_id}/{n}/{mode}", tls))
            modes[mode] = _summary(run)
        spec, plain = modes["speculative"], modes["plain"]
        level = {
            "sessions": n,
            "tokens_per_s_speculative": spec["tokens_per_s"],
            "tokens_per_s_plain": plain["tokens_per_s"],
            "speedup": round(spec["tokens_per_s"] / max(plain["tokens_per_s"], 1e-9), 3),
            "ttft_p50_ms": spec["ttft_p50_ms"], "ttft_p95_ms": spec["ttft_p95_ms"],
            "tpot_p50_ms": spec["tpot_p50_ms"], "tpot_p95_ms": spec["tpot_p95_ms"],
            "failed_requests": spec["failed_requests"] + plain["failed_requests"],
            "speculative": spec, "plain": plain,
        }
        console.print(f"  {n} sessions: {level['tokens_per_s_speculative']} vs {level['tokens_per_s_plain']} tok/s "
                      f"({level['speedup']}x), failed {level['failed_requests']}")
        out_levels.append(level)
    return {
        "benchmark": "load", "proxy": proxy, "duration_s_per_mode": duration_s, "max_new_tokens": max_new_tokens,
        "max_message_chars": max_message_chars, "context_cap": context_cap, "trajectories": len(convs),
        "calls_available": sum(len(c) for c in convs), "levels": out_levels,
    }
