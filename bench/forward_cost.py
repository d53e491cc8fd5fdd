"""Cost of one verification pass by context length and number of scored tokens.

Speculation pays off when a pass over 1 + k tokens costs much less than 1 + k
single-token passes; this measures that curve on the worker's real runtime.

Two series: ``fixed`` repeats each pass at one context length (the cache is rolled
back between repeats), ``growing`` decodes as a session does, each pass extending the
cache and asking for the top-k statistics the proxy asks for. They differ where a
kernel's cost depends on seeing a shape for the first time (on an H200, bf16 steps
in the stack cost ~3x the fixed-shape pass: bench/RESULTS.md, "On a GPU").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from quickdraft.verifiers.runtime import ModelRuntime, VerifyInput, VerifyOutput

# Top-k statistics per position that the proxy asks of every verification (proxy/speculation.py).
PROXY_TOP_LOGPROBS = 4


@dataclass(slots=True)
class CostPoint:
    context: int
    scored: int          # tokens scored in the pass: 1 new token + draft nodes
    median_ms: float
    series: str = "fixed"
    end_context: int = 0  # the session's length after the series (growing: more than context)


def _synthetic_prompt(length: int) -> list[int]:
    return [(i * 7919) % 40000 + 100 for i in range(length)]


def _timed_pass(runtime: ModelRuntime, key: str, history: list[int], known: int, n: int,
                top_logprobs: int = 0) -> tuple[float, VerifyOutput]:
    """One verification pass feeding ``history[known:]`` plus an ``n``-node chain draft; its milliseconds."""
    tokens = [(history[-1] + j + 1) % 40000 for j in range(n)]
    t0 = time.perf_counter()
    out = runtime.verify(VerifyInput(key, known, history[known - 16:known], history[known:], tokens,
                                     list(range(-1, n - 1)), top_logprobs=top_logprobs))
    return (time.perf_counter() - t0) * 1e3, out


def measure(runtime: ModelRuntime, contexts=(512, 2048, 4096), drafts=(0, 1, 3, 7, 15), repeats=5) -> list[dict]:
    points = []
    for ctx in contexts:
        key = f"cost-{ctx}"
        prompt = _synthetic_prompt(ctx)
        first = runtime.verify(VerifyInput(key, 0, [], prompt))
        history = prompt + first.tokens[:1]
        for n in drafts:
            times = [_timed_pass(runtime, key, history, len(prompt), n)[0] for _ in range(repeats)]
            points.append(asdict(CostPoint(ctx, n + 1, round(statistics.median(times), 1), end_context=ctx)))
        runtime.release(key)
    return points


def measure_growing(runtime: ModelRuntime, contexts=(512, 2048, 4096), drafts=(0, 7), steps=8) -> list[dict]:
    """Passes that extend the session as decoding does: each feeds the token the last pass emitted
    (plus a draft the model will mostly reject), so the key length differs from pass to pass."""
    points = []
    for ctx in contexts:
        key = f"grow-{ctx}"
        history = _synthetic_prompt(ctx)
        out = runtime.verify(VerifyInput(key, 0, [], history))
        history += out.tokens
        for n in drafts:
            times = []
            for _ in range(steps):
                ms, out = _timed_pass(runtime, key, history, out.cached_len, n, PROXY_TOP_LOGPROBS)
                times.append(ms)
                history += out.tokens
            points.append(asdict(CostPoint(ctx, n + 1, round(statistics.median(times), 1), "growing",
                                           out.cached_len)))
        runtime.release(key)
    return points
