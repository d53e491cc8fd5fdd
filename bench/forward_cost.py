"""Cost of one verification pass by context length and number of scored tokens.

Speculation pays off when a pass over 1 + k tokens costs much less than 1 + k
single-token passes; this measures that curve on the worker's real runtime.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from quickdraft.verifiers.runtime import ModelRuntime, VerifyInput


@dataclass(slots=True)
class CostPoint:
    context: int
    scored: int          # tokens scored in the pass: 1 new token + draft nodes
    median_ms: float


def measure(runtime: ModelRuntime, contexts=(512, 2048, 4096), drafts=(0, 1, 3, 7, 15), repeats=5) -> list[dict]:
    points = []
    for ctx in contexts:
        key = f"cost-{ctx}"
        prompt = [(i * 7919) % 40000 + 100 for i in range(ctx)]
        first = runtime.verify(VerifyInput(key, 0, [], prompt))
        history = prompt + first.tokens[:1]
        for n in drafts:
            times = []
            for _ in range(repeats):
                known = len(prompt)
                tokens = [(history[-1] + j + 1) % 40000 for j in range(n)]
                t0 = time.perf_counter()
                runtime.verify(VerifyInput(key, known, history[known - 16:known], history[known:], tokens,
                                           list(range(-1, n - 1))))
                times.append((time.perf_counter() - t0) * 1e3)
            points.append(asdict(CostPoint(ctx, n + 1, round(statistics.median(times), 1))))
        runtime.release(key)
    return points
