"""Prefill cost: a long prompt prefilled chunk by chunk, masked SDPA vs the worker's path.

Time to first token on an agent call is the prefill of its new tokens over a long
cached prefix. The worker computes such a chunk as two mask-free flash passes merged
by log-sum-exp (``verifiers/attention.py``); this runs that path, one SDPA call with
the chunk × context mask, and (with ``bf16``) the worker's path with its products in
bf16 (``small_linear.prefill_precision``), in turns, on one loaded model, and reports
their times and how far their last logits differ from the fp32 worker path's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from quickdraft.verifiers import small_linear
from quickdraft.verifiers.attention import CAUSAL_CHUNK_KWARG
from quickdraft.verifiers.kv_cache import cache_keyword, new_cache
from quickdraft.verifiers.runtime import PREFILL_CHUNK


@dataclass(slots=True)
class PrefillRun:
    path: str                 # "masked" (one SDPA call with a mask), "two-pass" (the worker's), "two-pass-bf16"
    seconds: float
    chunk_seconds: list[float] = field(default_factory=list)


def prefill(model: torch.nn.Module, ids: torch.Tensor, chunk: int, two_pass: bool,
            lowp: torch.dtype | None = None) -> tuple[PrefillRun, torch.Tensor]:
    """Prefill ``ids`` into a fresh cache chunk by chunk; the run's times and the last position's logits."""
    cache = new_cache(model.config.num_hidden_layers)
    extra = {CAUSAL_CHUNK_KWARG: True} if two_pass else {}
    extra[cache_keyword(model)] = cache
    times = []
    with torch.inference_mode(), small_linear.prefill_precision(lowp):
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            pos = torch.arange(start, start + part.shape[1])[None]
            t0 = time.perf_counter()
            out = model(input_ids=part, position_ids=pos, use_cache=True, logits_to_keep=1, **extra)
            times.append(round(time.perf_counter() - t0, 3))
    path = ("two-pass" if two_pass else "masked") + ("-bf16" if lowp is not None else "")
    return PrefillRun(path, round(sum(times), 2), times), out.logits[0, -1]


def measure(model: torch.nn.Module, tokens: int = 8192, chunk: int = PREFILL_CHUNK, rounds: int = 2,
            progress: bool = True, bf16: bool = False) -> dict:
    from rich.progress import Progress

    ids = torch.randint(100, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    runs: list[PrefillRun] = []
    last: dict[str, torch.Tensor] = {}
    paths: list[tuple[bool, torch.dtype | None]] = [(False, None), (True, None)]
    if bf16:
        paths.append((True, torch.bfloat16))
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"prefill {tokens} tokens", total=len(paths) * rounds)
        for r in range(rounds):
            for two_pass, lowp in (paths if r % 2 == 0 else paths[::-1]):  # alternate who goes first
                run, logits = prefill(model, ids, chunk, two_pass, lowp)
                runs.append(run)
                last[run.path] = logits
                bar.advance(task)
    masked = statistics.median(r.seconds for r in runs if r.path == "masked")
    two_pass = statistics.median(r.seconds for r in runs if r.path == "two-pass")
    extra = {}
    if bf16:
        lowp_s = statistics.median(r.seconds for r in runs if r.path == "two-pass-bf16")
        extra = {
            "bf16_s": round(lowp_s, 2),
            "bf16_speedup": round(two_pass / lowp_s, 3),
            "bf16_max_logit_diff": float((last["two-pass"] - last["two-pass-bf16"]).abs().max()),
            "bf16_same_argmax": bool(last["two-pass"].argmax() == last["two-pass-bf16"].argmax()),
        }
    return {
        "tokens": tokens,
        "chunk": chunk,
        "masked_s": round(masked, 2),
        "two_pass_s": round(two_pass, 2),
        "speedup": round(masked / two_pass, 3),
        "max_logit_diff": float((last["masked"] - last["two-pass"]).abs().max()),
        "same_argmax": bool(last["masked"].argmax() == last["two-pass"].argmax()),
        **extra,
        "runs": [asdict(r) for r in runs],
    }
