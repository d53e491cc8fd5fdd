"""Prefill cost: a long prompt prefilled chunk by chunk, masked SDPA vs the worker's path.

Time to first token on an agent call is the prefill of its new tokens over a long
cached prefix. The worker computes such a chunk as two mask-free flash passes merged
by log-sum-exp (``verifiers/attention.py``); this runs both that path and one SDPA call
with the chunk × context mask, alternating, on one loaded model, and reports their
times and how far their last logits differ.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from quickdraft.verifiers.attention import CAUSAL_CHUNK_KWARG
from quickdraft.verifiers.kv_cache import new_cache
from quickdraft.verifiers.runtime import PREFILL_CHUNK


@dataclass(slots=True)
class PrefillRun:
    path: str                 # "masked" (one SDPA call with a mask) or "two-pass" (the worker's)
    seconds: float
    chunk_seconds: list[float] = field(default_factory=list)


def prefill(model: torch.nn.Module, ids: torch.Tensor, chunk: int, two_pass: bool) -> tuple[PrefillRun, torch.Tensor]:
    """Prefill ``ids`` into a fresh cache chunk by chunk; the run's times and the last position's logits."""
    cache = new_cache(model.config.num_hidden_layers)
    extra = {CAUSAL_CHUNK_KWARG: True} if two_pass else {}
    times = []
    with torch.inference_mode():
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            pos = torch.arange(start, start + part.shape[1])[None]
            t0 = time.perf_counter()
            out = model(input_ids=part, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1, **extra)
            times.append(round(time.perf_counter() - t0, 3))
    return PrefillRun("two-pass" if two_pass else "masked", round(sum(times), 2), times), out.logits[0, -1]


def measure(model: torch.nn.Module, tokens: int = 8192, chunk: int = PREFILL_CHUNK, rounds: int = 2,
            progress: bool = True) -> dict:
    from rich.progress import Progress

    ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    runs: list[PrefillRun] = []
    last: dict[str, torch.Tensor] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"prefill {tokens} tokens", total=2 * rounds)
        for r in range(rounds):
            for two_pass in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
                run, logits = prefill(model, ids, chunk, two_pass)
                runs.append(run)
                last[run.path] = logits
                bar.advance(task)
    masked = statistics.median(r.seconds for r in runs if r.path == "masked")
    two_pass = statistics.median(r.seconds for r in runs if r.path == "two-pass")
    return {
        "tokens": tokens,
        "chunk": chunk,
        "masked_s": round(masked, 2),
        "two_pass_s": round(two_pass, 2),
        "speedup": round(masked / two_pass, 3),
        "max_logit_diff": float((last["masked"] - last["two-pass"]).abs().max()),
        "same_argmax": bool(last["masked"].argmax() == last["two-pass"].argmax()),
        "runs": [asdict(r) for r in runs],
    }
