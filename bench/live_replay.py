"""Live replay: agent trajectories through a running proxy, speculation on vs off.

Every call is sent twice over gRPC, first with speculation on, then off, each
mode in its own session per trajectory (so both reuse KV the same way). The
speed figures are completion tokens divided by the summed wall time of the
calls, time to first token and prefill included.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc

from quickdraft.bench.traces import all_calls
from quickdraft.catalog import chat_prompt_ids, load_tokenizer
from quickdraft.client import QuickDraftClient
from quickdraft.proto.tls import TlsConfig


@dataclass(slots=True)
class CallRecord:
    trajectory: str
    index: int
    prompt_tokens: int
    reused_prompt_tokens: int
    completion_tokens: int
    steps: int
    ttft_ms: float              # speculative run
    ttft_ms_plain: float
    wall_ms: float
    wall_ms_plain: float


@dataclass(slots=True)
class LiveReport:
    proxy: str
    model: str
    calls: int
    skipped_calls: int
    steps: int
    output_tokens: int
    tokens_per_step: float
    mean_accepted_per_step: float
    drafted_per_step: float
    ttft_ms_p50: float
    ttft_ms_p50_plain: float
    tokens_per_s_speculative: float
    tokens_per_s_plain: float
    speedup: float
    outputs_identical: bool
    mismatched_calls: int
    max_new_tokens: int
    wall_s: float
    # With --redis-url: commands the Redis server executed during the replay, per output token
    # (speculative and plain runs together), from its INFO commandstats.
    redis_commands: int | None = None
    redis_commands_per_token: float | None = None
    redis_commands_by_type: dict[str, int] | None = None
    # One entry per call sent: how much of its prompt the worker reused, and what it cost.
    per_call: list[CallRecord] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def replay_live(
    paths: Sequence[str | pathlib.Path],
    proxy: str = "127.0.0.1:50051",
    max_calls: int = 20,
    max_new_tokens: int = 128,
    model: str = "auto",
    drafter: str = "",
    tokenizer_name: str = "smollm2-135m",
    api_key: str | None = None,
    progress: bool = True,
    redis_url: str | None = None,
    tls: TlsConfig | None = None,
) -> LiveReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    tok = load_tokenizer(tokenizer_name)
    redis_before = _redis_commands(redis_url) if redis_url else None
    with QuickDraftClient(proxy, api_key, tls) as client:
        listing = client.list_models()
        served = listing.default_model if model == "auto" else model
        context = {m.name: m.context_length for m in listing.models}.get(served)
        if context is None:
            raise SystemExit(f"the proxy at {proxy} serves no model {served!r}")
        sent = skipped = 0
        steps = accepted = drafted = 0
        spec_tokens = plain_tokens = 0
        spec_s = plain_s = 0.0
        ttft_spec: list[float] = []
        ttft_plain: list[float] = []
        mismatched = 0
        records: list[CallRecord] = []
        columns = (TextColumn("live replay"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("speedup {task.fields[speedup]}"), TimeElapsedColumn())
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("live", total=max_calls, speedup="-")
            for call in all_calls(paths):
                if sent >= max_calls:
                    break
                if len(chat_prompt_ids(tok, call.messages)) + max_new_tokens > context:
                    skipped += 1
                    continue
                results = []
                try:
                    for mode, speculate in (("spec", True), ("plain", False)):
                        results.append(client.generate(
                            call.messages, model=model, max_tokens=max_new_tokens, speculate=speculate,
                            drafter=drafter, session_id=f"{call.trajectory}/{mode}",
                        ))
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in (exc.details() or ""):
                        skipped += 1
                        continue
                    raise
                spec, plain = results
                sent += 1
                steps += spec.usage.verification_steps
                accepted += spec.usage.accepted_draft_tokens
                drafted += spec.usage.drafted_tokens
                spec_tokens += len(spec.token_ids)
                plain_tokens += len(plain.token_ids)
                spec_s += spec.wall_s
                plain_s += plain.wall_s
                ttft_spec.append(spec.ttft_s * 1e3)
                ttft_plain.append(plain.ttft_s * 1e3)
                mismatched += spec.token_ids != plain.token_ids
                records.append(CallRecord(
                    call.trajectory, call.index, spec.usage.prompt_tokens, spec.usage.reused_prompt_tokens,
                    len(spec.token_ids), spec.usage.verification_steps, round(spec.ttft_s * 1e3, 1),
                    round(plain.ttft_s * 1e3, 1), round(spec.wall_s * 1e3, 1), round(plain.wall_s * 1e3, 1),
                ))
                tps_spec = spec_tokens / max(spec_s, 1e-9)
                tps_plain = plain_tokens / max(plain_s, 1e-9)
                bar.update(task, advance=1, speedup=f"{tps_spec / max(tps_plain, 1e-9):.2f}x")
    tps_spec = spec_tokens / max(spec_s, 1e-9)
    tps_plain = plain_tokens / max(plain_s, 1e-9)
    steps_ = max(steps, 1)
    redis_commands = by_type = None
    if redis_before is not None:
        after = _redis_commands(redis_url)
        by_type = {k: after.get(k, 0) - redis_before.get(k, 0) for k in after}
        by_type["info"] = by_type.get("info", 0) - 1  # our own first INFO
        by_type = {k: v for k, v in sorted(by_type.items()) if v > 0}
        redis_commands = sum(by_type.values())
    return LiveReport(
        proxy=proxy,
        model=served,
        calls=sent,
        skipped_calls=skipped,
        steps=steps,
        output_tokens=spec_tokens,
        tokens_per_step=round(spec_tokens / steps_, 4),
        mean_accepted_per_step=round(accepted / steps_, 4),
        drafted_per_step=round(drafted / steps_, 3),
        ttft_ms_p50=round(statistics.median(ttft_spec), 1) if ttft_spec else 0.0,
        ttft_ms_p50_plain=round(statistics.median(ttft_plain), 1) if ttft_plain else 0.0,
        tokens_per_s_speculative=round(tps_spec, 2),
        tokens_per_s_plain=round(tps_plain, 2),
        speedup=round(tps_spec / max(tps_plain, 1e-9), 3),
        outputs_identical=mismatched == 0,
        mismatched_calls=mismatched,
        max_new_tokens=max_new_tokens,
        wall_s=round(time.perf_counter() - started, 1),
        redis_commands=redis_commands,
        redis_commands_per_token=(
            round(redis_commands / max(spec_tokens + plain_tokens, 1), 4) if redis_commands is not None else None
        ),
        redis_commands_by_type=by_type,
        per_call=records,
    )


def _redis_commands(url: str) -> dict[str, int]:
    """Commands the server has executed since its start (all clients) by name, from INFO commandstats."""
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
