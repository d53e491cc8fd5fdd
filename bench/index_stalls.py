"""How long learning one response can hold up the caller, with index maintenance in the call and
on a maintenance thread (``SuffixDrafter.maintain_in``, what the proxy does)::

    python -m quickdraft.bench.index_stalls --cap 4000000 --json out.json

A tenant's response index is fed synthetic responses (100-500 tokens, windows of one Zipf-like
token stream, so n-grams repeat as in real text) until it has gone past its cap twice, so it is
frozen, evicted and compacted many times, at ``--tokens-per-s`` (100 K by default: far more than
a CPU proxy generates, about what a large GPU deployment learns for one tenant). Every
``learn_response`` is timed; the longest ones are the pauses an event loop serving that tenant
would see. Both ways run in one process, one after
the other, on the same responses.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from quickdraft.suffix_cache.base import Scope
from quickdraft.suffix_cache.suffix import SuffixDrafter, SuffixParams


@dataclass(slots=True)
class StallFigures:
    maintenance: str          # "in the call" or "on a thread"
    calls: int
    median_us: float
    worst_ms: list[float]     # the five longest calls
    calls_over_50ms: int
    seconds_over_50ms: float  # summed time of those calls


def responses(total_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    stream = [int(rng.paretovariate(1.1)) % 49152 for _ in range(200_000)]
    out, total = [], 0
    while total < total_tokens:
        n = rng.randint(100, 500)
        start = rng.randrange(len(stream) - n)
        out.append(stream[start:start + n])
        total += n
    return out


def measure(answers: list[list[int]], cap: int, threaded: bool, rebuild_above: int | None = None,
            tokens_per_s: float = 0.0) -> StallFigures:
    params = SuffixParams(global_max_tokens=cap)
    if rebuild_above is not None:
        params.rebuild_above = rebuild_above
    drafter = SuffixDrafter(params)
    pool = ThreadPoolExecutor(1, thread_name_prefix="index-maintenance") if threaded else None
    drafter.maintain_in(pool)
    scope = Scope("bench", "synthetic")
    times = []
    due = time.perf_counter()
    for answer in answers:
        if tokens_per_s > 0:  # the responses arrive at that rate, as generated; the wait is not timed
            due += len(answer) / tokens_per_s
            time.sleep(max(0.0, due - time.perf_counter()))
        started = time.perf_counter()
        drafter.learn_response(scope, answer)
        times.append(time.perf_counter() - started)
    if pool is not None:
        pool.shutdown(wait=True)
    slow = [t for t in times if t > 0.05]
    return StallFigures("on a thread" if threaded else "in the call", len(times),
                        round(statistics.median(times) * 1e6, 1),
                        [round(t * 1e3, 1) for t in sorted(times, reverse=True)[:5]],
                        len(slow), round(sum(slow), 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap", type=int, default=4_000_000, help="response tokens kept per tenant")
    parser.add_argument("--rebuild-above", type=int, help="live tokens from which the thread rebuilds "
                        f"(default {SuffixParams.rebuild_above})")
    parser.add_argument("--tokens-per-s", type=float, default=100_000.0,
                        help="rate at which responses arrive (0: as fast as they can be learned)")
    parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
    args = parser.parse_args(argv)
    answers = responses(int(args.cap * 2.2))
    figures = [measure(answers, args.cap, threaded, args.rebuild_above, args.tokens_per_s)
               for threaded in (False, True)]
    for f in figures:
        print(f"{f.maintenance:>12}: {f.calls} calls, median {f.median_us} us, longest {f.worst_ms} ms, "
              f"{f.calls_over_50ms} over 50 ms ({f.seconds_over_50ms} s)")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "index_stalls", "cap": args.cap,
                                         "tokens_per_s": args.tokens_per_s,
                                         "results": [asdict(f) for f in figures]}, indent=2))


if __name__ == "__main__":
    main()
